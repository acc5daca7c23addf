"""Stabilising tricks of Salimans et al. 2016, each switchable from the ``tricks`` config group.

Hook tricks (a ``_target_`` in their config) act on the losses and updates through :class:`ganlab.module.Trick`;
structural tricks (minibatch discrimination, virtual batch norm, batch norm in D) are settings the network
builders read.
"""

from ganlab.tricks.historical_averaging import HistoricalAveraging
from ganlab.tricks.label_smoothing import LabelSmoothing
from ganlab.tricks.minibatch_discrimination import MinibatchDiscrimination
from ganlab.tricks.virtual_batch_norm import VirtualBatchNorm

__all__ = ["HistoricalAveraging", "LabelSmoothing", "MinibatchDiscrimination", "VirtualBatchNorm"]
