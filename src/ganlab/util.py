"""The small vocabulary every layer shares: when a step is due, logging to every logger, a network in eval mode.

Each rule has exactly one spelling here, so the sample grids, checkpoints, evaluation and progress lines can never
disagree about which generator steps they act on.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def is_due(step: int, every: int, last: int) -> bool:
    """True right after generator step ``step`` when it completes an interval of ``every`` steps, and after the
    last step ``last`` (so the end of a run is always sampled, evaluated and saved)."""
    return step % every == 0 or step == last


def log_to_all(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger at generator step ``step`` (the x-axis of every chart)."""
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode (batch norm on running statistics) for the block, then its previous mode again."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


_BATCH_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batch_norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """``net``'s batch-norm layers, found once per network: the training step asks for them at every update, and
    a network's layers do not change after it is built."""
    if net not in _BATCH_NORMS:
        _BATCH_NORMS[net] = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return _BATCH_NORMS[net]


@contextmanager
def frozen_norm_stats(net: nn.Module) -> Iterator[nn.Module]:
    """``net``'s batch-norm layers still normalise with the batch's statistics in training mode, but leave their
    running statistics (and ``num_batches_tracked``) untouched for the block: for passes whose batch must not
    shape what eval mode uses later (fake batches, the generator's passes through D)."""
    layers = [m for m in _batch_norms(net) if m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # in training mode: batch statistics, no update of the running ones
    try:
        yield net
    finally:
        for m in layers:
            m.track_running_stats = True


def chunked(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """``fn`` over ``x`` in chunks of ``size`` examples, concatenated: how every eval-mode pass of D runs, in
    chunks of the training batch size, so a layer that looks across its batch (minibatch discrimination) sees
    batches of the size it was trained on, whatever the number of examples evaluated."""
    return torch.cat([fn(part) for part in x.split(int(size))])
