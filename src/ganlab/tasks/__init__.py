"""Tasks (the ``task`` config group): the LightningModules that run a schedule of updates.

- :class:`~ganlab.tasks.gan.GANModule`: the generative game (``task=gan``);
- :class:`~ganlab.tasks.semi_supervised.SemiSupervisedGAN`: D as a K-class classifier (``task=semi_supervised``).
"""

from ganlab.tasks.gan import GANModule
from ganlab.tasks.semi_supervised import SemiSupervisedGAN

__all__ = ["GANModule", "SemiSupervisedGAN"]
