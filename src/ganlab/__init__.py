"""ganlab: a laboratory for training GANs and comparing their objectives and tricks under equal conditions."""

__version__ = "0.1.0"
