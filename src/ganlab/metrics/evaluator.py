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

With the digits CNN, an evaluation runs the network once over the generated samples
(:func:`~ganlab.metrics.fidelity.digits_pass`): the stacked mode count takes its labels from that pass when its
classifier is the same weights file, and FID/IS/KID/precision/recall come from the same features against a
reference computed once per run (:class:`~ganlab.metrics.fidelity.DigitsReference`, cached on disk). The numbers
are :func:`~ganlab.metrics.fidelity.compute_fidelity`'s and the mode metric's own (``tests/test_metrics.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ganlab.metrics.fidelity import (
    DIGITS_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    DigitsReference,
    compute_fidelity,
    default_cache_dir,
    digits_pass,
    fidelity_from_pass,
    preflight,
    weights_identity,
)


class Evaluator:
    """Callable ``samples -> dict[str, float]`` for one data set (build it with :func:`build_evaluator`).

    ``samples``: ``float [N, D]`` points or ``uint8 [N, C, H, W]`` images, N >= ``n_samples`` (extra rows, e.g.
    padding from a distributed gather, are dropped so every evaluation follows the same protocol).

    ``interim_samples``: the sample count of evaluations before the last one of a run, for data sets whose protocol
    is too costly to repeat (``EvalSpec.interim_samples``; default ``n_samples``). Such an evaluation is called with
    ``n_samples=evaluator.interim_samples`` and its names carry that count (``stacked_modes2k`` during the run,
    ``stacked_modes26k`` at its end), so a number never changes meaning.
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
        interim_samples: int | None = None,
    ) -> None:
        self.n_samples, self.modes = n_samples, modes
        self.interim_samples = interim_samples or n_samples
        self.reference, self.reference_name = reference, reference_name
        self.extractor, self.weights_path = extractor, weights_path
        self.device, self.kid_subset_size = device, kid_subset_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._digits_reference: DigitsReference | None = None  # built at the first evaluation, then kept

    def __call__(self, samples: Tensor, n_samples: int | None = None) -> dict[str, float]:
        """The metrics of the first ``n_samples`` samples (default: the protocol's ``self.n_samples``)."""
        n = n_samples or self.n_samples
        if len(samples) < n:
            raise ValueError(f"evaluation needs {n} samples, got {len(samples)}")
        samples = samples[:n].detach()
        if self.extractor == DIGITS_EXTRACTOR:
            return self._digits(samples)
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

    def digits_reference(self) -> DigitsReference:
        """The fidelity reference seen by the digits CNN (features, FID statistics, k-NN radii), kept per run."""
        if self._digits_reference is None:
            self._digits_reference = DigitsReference(
                self.reference,
                weights_path=self.weights_path,
                device=self.device,
                cache_dir=self.cache_dir,
                cache_key_parts=self.reference_name or None,
            )
        return self._digits_reference

    def shares_digits_cnn(self) -> bool:
        """Whether the mode metric's classifier is the fidelity extractor's network (the same weights file)."""
        weights = getattr(self.modes, "weights", None)
        if self.extractor != DIGITS_EXTRACTOR or weights is None or not hasattr(self.modes, "from_labels"):
            return False
        return Path(weights).resolve() == Path(weights_identity(DIGITS_EXTRACTOR, self.weights_path)[0]).resolve()

    def _digits(self, samples: Tensor) -> dict[str, float]:
        """One CNN pass over the samples; its labels feed the mode count, its features every fidelity metric."""
        reference = self.digits_reference()
        passed = digits_pass(samples, reference.net)
        out: dict[str, float] = {}
        if self.modes is not None:
            out.update(self.modes.from_labels(passed.labels) if self.shares_digits_cnn() else self.modes(samples))
        out.update(fidelity_from_pass(passed, reference, kid_subset_size=self.kid_subset_size))
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
        n_samples: generated samples per evaluation; None: the data set's protocol (``evaluation.samples``, and
            ``evaluation.interim_samples`` where a data set declares a cheaper count for the evaluations before a
            run's last). Metric names carry it (``fid2k``, ``modes2500``).
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
        interim_samples=n_samples or getattr(spec, "interim_samples", None),
        modes=spec.modes.prepare(data, cache_dir=cache_dir) if spec.modes is not None else None,
        reference=reference,
        reference_name=(data.name, "train"),  # identity of the reference in the cache key, not behaviour
        extractor=extractor,
        weights_path=weights,
        device=device,
        kid_subset_size=kid_subset_size,
        cache_dir=cache_dir,
    )
