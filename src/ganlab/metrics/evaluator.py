"""A data set's metrics bundled into one callable: generated samples in, a flat dict of numbers out.

What is computed is read from the data set's declaration, ``data.evaluation`` (an
:class:`~ganlab.data.base.EvalSpec`), never from its name:

- ``features``: the torch-fidelity feature extractor for FID/IS/KID/precision/recall (the digits CNN,
  Inception-v3 with ``metrics.inception_weights``, or None for no fidelity metrics);
- ``modes``: a mode-coverage metric (:class:`~ganlab.metrics.modes.MixtureModes`,
  :class:`~ganlab.metrics.stacked.StackedModes`) or None;
- ``samples``: the protocol's sample count, unless ``metrics.n_samples`` sets another.

Every name carries the sample count (``fid2k``, ``modes2500``, ``stacked_kl26k``). The reference for fidelity
metrics is the train split; its features are cached (see :mod:`ganlab.metrics.fidelity`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ganlab.metrics.fidelity import INCEPTION_EXTRACTOR, compute_fidelity, default_cache_dir, preflight


class Evaluator:
    """Callable ``samples -> dict[str, float]`` for one data set (build it with :func:`build_evaluator`).

    ``samples``: ``float [N, D]`` points or ``uint8 [N, C, H, W]`` images, N >= ``n_samples`` (extra rows, e.g.
    padding from a distributed gather, are dropped so every evaluation follows the same protocol).
    """

    def __init__(
        self,
        n_samples: int,
        *,
        modes: Callable[[Tensor], dict[str, float]] | None = None,
        reference: Tensor | None = None,
        reference_name: tuple[str, ...] = (),
        extractor: str | None = None,
        weights_path: str | None = None,
        device: str | torch.device = "cpu",
        kid_subset_size: int = 1000,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.n_samples, self.modes = n_samples, modes
        self.reference, self.reference_name = reference, reference_name
        self.extractor, self.weights_path = extractor, weights_path
        self.device, self.kid_subset_size = device, kid_subset_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def __call__(self, samples: Tensor) -> dict[str, float]:
        if len(samples) < self.n_samples:
            raise ValueError(f"evaluation needs {self.n_samples} samples, got {len(samples)}")
        samples = samples[: self.n_samples].detach()
        out: dict[str, float] = {}
        if self.modes is not None:
            out.update(self.modes(samples))
        if self.extractor is not None:
            out.update(
                compute_fidelity(
                    samples,
                    self.reference,
                    extractor=self.extractor,
                    weights_path=self.weights_path,
                    device=self.device,
                    kid_subset_size=self.kid_subset_size,
                    cache_dir=self.cache_dir,
                    cache_key_parts=self.reference_name,
                )
            )
        return out


def build_evaluator(
    data,
    *,
    n_samples: int | None = None,
    device: str | torch.device = "cpu",
    inception_weights: str | None = None,
    kid_subset_size: int = 1000,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Evaluator:
    """The evaluation callable for an :class:`~ganlab.data.base.InMemoryData`, as its ``evaluation`` declares.

    Args:
        data: the data module (``setup()`` is called here); the train split is the fidelity reference.
        n_samples: generated samples per evaluation; None: the data set's protocol (``evaluation.samples``).
            Metric names carry it (``fid2k``, ``modes2500``).
        device: where feature extractors run.
        inception_weights: local Inception-v3 weights (``metrics.inception_weights``); None downloads them.
        kid_subset_size: requested KID subset size (capped at the sample counts).
        cache_dir: reference-statistics and classifier cache (default ``$GANLAB_CACHE/fidelity``).
    """
    data.setup()
    spec = data.evaluation
    extractor, weights, reference = spec.features, None, None
    if extractor is not None:
        weights = inception_weights if extractor == INCEPTION_EXTRACTOR else None
        preflight(extractor, weights)  # missing weights fail now, before the first step, not at the first evaluation
        reference = data.train_x.detach().cpu()
    return Evaluator(
        n_samples or spec.samples,
        modes=spec.modes.prepare(data, cache_dir=cache_dir) if spec.modes is not None else None,
        reference=reference,
        reference_name=(data.name, "train"),  # identity of the reference in the cache key, not behaviour
        extractor=extractor,
        weights_path=weights,
        device=device,
        kid_subset_size=kid_subset_size,
        cache_dir=cache_dir,
    )
