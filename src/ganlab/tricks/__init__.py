"""Stabilising tricks of Salimans et al. 2016, each a ``_target_`` object of the ``tricks`` config group.

The interface (:mod:`ganlab.tricks.base`) imports nothing from the training loop: a trick changes the networks
before training (a normalisation factory, inserted layers, a wrapped G), the D loss's real target, or each update
(a penalty, an after-update hook), and saves its state in checkpoints.
"""

from ganlab.tricks.base import LayerInsert, Player, Trick, network_args
from ganlab.tricks.batch_norm_d import BatchNormD
from ganlab.tricks.ema import AveragedGenerator, GeneratorEMA
from ganlab.tricks.historical_averaging import HistoricalAveraging
from ganlab.tricks.label_smoothing import LabelSmoothing
from ganlab.tricks.minibatch_discrimination import MinibatchDiscrimination, MinibatchDiscriminationD
from ganlab.tricks.spectral_norm import SpectralNormD
from ganlab.tricks.virtual_batch_norm import ReferenceBatch, VirtualBatchNorm, VirtualBatchNormG

__all__ = [
    "AveragedGenerator",
    "BatchNormD",
    "GeneratorEMA",
    "HistoricalAveraging",
    "LabelSmoothing",
    "LayerInsert",
    "MinibatchDiscrimination",
    "MinibatchDiscriminationD",
    "Player",
    "ReferenceBatch",
    "SpectralNormD",
    "Trick",
    "VirtualBatchNorm",
    "VirtualBatchNormG",
    "network_args",
]
