"""Stabilising tricks of Salimans et al. 2016, each switchable from the ``tricks`` config group."""

from ganlab.tricks.minibatch_discrimination import MinibatchDiscrimination

__all__ = ["MinibatchDiscrimination"]
