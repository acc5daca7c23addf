"""The small vocabulary every layer shares: when a step is due, logging to every logger, a network in eval mode.

Each rule has exactly one spelling here, so the sample grids, checkpoints, evaluation and progress lines can never
disagree about which generator steps they act on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn


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
