"""Generator and discriminator networks (the ``model`` config group)."""

from ganlab.nets.base import Discriminator
from ganlab.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from ganlab.nets.mlp import MLPDiscriminator, MLPGenerator

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "Discriminator", "MLPDiscriminator", "MLPGenerator"]
