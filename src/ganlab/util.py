"""The small vocabulary every layer shares: when a step is due, logging to every logger, a network in eval mode.

Each rule has exactly one spelling here, so the sample grids, checkpoints, evaluation and progress lines can never
disagree about which generator steps they act on.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


# -- several processes (DDP) ------------------------------------------------------------------------------------------
#
# Every helper below is a collective of the default process group: every rank must call it at the same point, and
# the callers only do so when the run has more than one process (one process never touches torch.distributed).


def all_reduce_mean_(tensors: Sequence[Tensor], world: int) -> None:
    """Average ``tensors`` in place over the ``world`` ranks: one flat all-reduce per dtype (each rank ends with
    the same bits: the sum is reduced once and shared)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat.div_(world)
        for t, synced in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            t.copy_(synced)


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src)


def gather_rows(fn: Callable[[Tensor], Tensor], x: Tensor, rank: int, world: int) -> Tensor:
    """``fn(x)`` computed in ``world`` equal shares of ``x``'s rows, each rank its own, and gathered on every rank
    in row order (the last share padded, the padding dropped): every rank returns the same tensor."""
    import torch.distributed as dist

    n = len(x)
    per = -(-n // world)
    padded = torch.cat([x, x.new_zeros((per * world - n, *x.shape[1:]))]) if per * world > n else x
    part = fn(padded[rank * per : (rank + 1) * per]).contiguous()
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part)
    return torch.cat(parts)[:n]
