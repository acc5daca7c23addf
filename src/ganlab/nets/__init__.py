"""Generator and discriminator networks (the ``model`` config group) and the noise prior."""

from ganlab.nets.base import Discriminator, batch_norm, resolve_norm
from ganlab.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from ganlab.nets.mlp import MLPDiscriminator, MLPGenerator
from ganlab.nets.prior import Prior

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "Discriminator",
    "MLPDiscriminator",
    "MLPGenerator",
    "Prior",
    "batch_norm",
    "resolve_norm",
]
