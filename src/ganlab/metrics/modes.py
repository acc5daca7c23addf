"""Mode coverage on 2-D Gaussian mixtures: PacGAN's Table 1 metrics (Lin et al. 2018, "PacGAN", §5.1).

- a generated sample is *high quality* if its Euclidean distance to the nearest mode centre is at most 3 std;
- a mode is *captured* if at least one high-quality sample has it as nearest centre;
- reverse KL = KL(p_gen || uniform over the K modes), p_gen being the histogram of the high-quality samples over
  their nearest modes: sum_k p_k log(K p_k) = log K - H(p_gen), from 0 (all modes equally hit) to log K (one mode).

PacGAN evaluates 2,500 samples; every name carries the sample count (``modes2500``, ``hq_fraction2500``,
``reverse_kl2500``; :func:`~ganlab.metrics.protocol.protocol_name`).

A data set declares these metrics with ``EvalSpec(modes=MixtureModes())`` and provides ``centers [K, 2]`` and
``std`` (see :class:`~ganlab.data.toy.GaussianMixture2D`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ganlab.metrics.protocol import protocol_name

HQ_RADIUS_STDS = 3.0


def kl_to_uniform(counts: Tensor, k: int) -> float:
    """KL(p || uniform over ``k`` bins) of the histogram ``counts`` (``k`` entries, at least one non-zero).

    sum_i p_i log(k p_i), with 0 log 0 = 0 (empty bins add nothing), in nats.
    """
    counts = counts.double()
    p = counts / counts.sum()
    nz = p > 0
    return float((p[nz] * torch.log(k * p[nz])).sum())


def mode_coverage(
    samples: Tensor, centers: Tensor, std: float, *, radius_stds: float = HQ_RADIUS_STDS
) -> dict[str, float]:
    """PacGAN Table 1 metrics of ``samples [N, 2]`` against the mixture ``centers [K, 2]`` with component ``std``.

    Returns, named with N = ``len(samples)`` (``modes2500`` for 2,500): ``modes<N>`` (number of captured modes,
    0..K), ``hq_fraction<N>`` (fraction of high-quality samples) and ``reverse_kl<N>`` (KL of the high-quality
    mode histogram to uniform, nats).

    With no high-quality sample at all the histogram is undefined; ``reverse_kl<N>`` is then ``log K``, the value
    of a total collapse onto one mode and the largest value it takes otherwise: it stays finite (so means and
    confidence intervals over seeds stay finite) and never looks better than any run that hit a mode.
    """
    if samples.dim() != 2 or samples.shape[1] != centers.shape[1]:
        raise ValueError(f"samples must be [N, {centers.shape[1]}], got {tuple(samples.shape)}")
    k = len(centers)
    x = samples.detach().double().cpu()
    c = centers.detach().double().cpu()
    n = len(x)
    if n == 0:
        return _named({"modes": 0.0, "hq_fraction": 0.0, "reverse_kl": math.log(k)}, n)
    dist = torch.cdist(x, c)  # [N, K]
    nearest_dist, nearest = dist.min(dim=1)
    hq = nearest_dist <= radius_stds * std
    counts = torch.bincount(nearest[hq], minlength=k)  # [K] high-quality samples per mode
    n_hq = int(hq.sum())
    values = {
        "modes": float((counts > 0).sum()),
        "hq_fraction": n_hq / n,
        "reverse_kl": kl_to_uniform(counts, k) if n_hq > 0 else math.log(k),
    }
    return _named(values, n)


def _named(values: dict[str, float], n: int) -> dict[str, float]:
    return {protocol_name(key, n): value for key, value in values.items()}


@dataclass(frozen=True)
class MixtureModes:
    """PacGAN Table 1 mode metrics for a 2-D Gaussian mixture: the data set supplies ``centers`` and ``std``."""

    radius_stds: float = HQ_RADIUS_STDS  # a sample within this many std of its nearest centre is high quality

    def prepare(
        self, data: Any, *, cache_dir: str | os.PathLike[str] | None = None
    ) -> Callable[[Tensor], dict[str, float]]:
        centers, std = getattr(data, "centers", None), getattr(data, "std", None)
        if centers is None or std is None:
            raise ValueError(f"{data.name}: MixtureModes needs the data set's mixture centers and std")
        centers, std = torch.as_tensor(centers, dtype=torch.float32), float(std)
        return lambda samples: mode_coverage(samples, centers, std, radius_stds=self.radius_stds)
