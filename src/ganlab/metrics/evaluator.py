"""Which metrics a data set gets, bundled into one callable: generated samples in, a flat dict of numbers out.

- 2-D mixtures (``ring8``, ``grid25``): PacGAN Table 1, ``modes``, ``hq_fraction``, ``reverse_kl``;
- other points (``gauss1d``): none (an empty dict);
- ``digits``: FID/IS/KID/precision/recall with the digits CNN;
- ``stacked_digits``: PacGAN Table 2 ``modes``, ``kl`` (shipped digits CNN per channel) + fidelity with the CNN;
- ``stacked_mnist``: ``modes``, ``kl`` (a per-channel classifier trained once from the labels) + Inception;
- anything else (``mnist``, ``cifar10``, ``folder``): fidelity with Inception-v3 (``metrics.inception_weights``).

The reference for fidelity metrics is the train split; its features are cached (see :mod:`ganlab.metrics.fidelity`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ganlab.errors import UserError
from ganlab.metrics.classifier import MIN_ACCURACY, DigitsClassifier, load_digits_classifier, train_classifier
from ganlab.metrics.fidelity import (
    DIGITS_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    compute_fidelity,
    default_cache_dir,
    tensor_digest,
    weights_identity,
)
from ganlab.metrics.modes import mode_coverage
from ganlab.metrics.stacked import classify_channels, stacked_mode_stats

log = logging.getLogger(__name__)

DIGITS_NAMES = ("digits", "stacked_digits")
STACKED_NAMES = ("stacked_digits", "stacked_mnist")


class Evaluator:
    """Callable ``samples -> dict[str, float]`` for one data set (build it with :func:`build_evaluator`).

    ``samples``: ``float [N, D]`` points or ``uint8 [N, C, H, W]`` images, N >= ``n_samples`` (extra rows, e.g.
    padding from a distributed gather, are dropped so every evaluation follows the same protocol).
    """

    def __init__(
        self,
        kind: str,
        n_samples: int,
        *,
        centers: Tensor | None = None,
        std: float | None = None,
        reference: Tensor | None = None,
        reference_name: tuple[str, ...] = (),
        extractor: str | None = None,
        weights_path: str | None = None,
        classifier: DigitsClassifier | None = None,
        device: str | torch.device = "cpu",
        kid_subset_size: int = 1000,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.kind, self.n_samples = kind, n_samples
        self.centers, self.std = centers, std
        self.reference, self.reference_name = reference, reference_name
        self.extractor, self.weights_path, self.classifier = extractor, weights_path, classifier
        self.device, self.kid_subset_size = device, kid_subset_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def __call__(self, samples: Tensor) -> dict[str, float]:
        if len(samples) < self.n_samples:
            raise ValueError(f"evaluation needs {self.n_samples} samples, got {len(samples)}")
        samples = samples[: self.n_samples].detach()
        out: dict[str, float] = {}
        if self.centers is not None:
            out.update(mode_coverage(samples, self.centers, self.std))
        if self.classifier is not None:
            out.update(stacked_mode_stats(classify_channels(samples.cpu(), self.classifier)))
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


def _decode_triples(y: Tensor) -> Tensor:
    """Stacked labels as ``[N, 3]`` digits: given as ``[N, 3]`` or as ``100 a + 10 b + c``."""
    if y.dim() == 2 and y.shape[1] == 3:
        return y.long()
    y = y.long().view(-1)
    return torch.stack([y // 100, y // 10 % 10, y % 10], dim=1)


def channel_classifier_from_labels(
    data, cache_dir: str | os.PathLike[str] | None = None, *, epochs: int | None = None
) -> DigitsClassifier:
    """A per-channel digit classifier for stacked data without shipped weights (``stacked_mnist``).

    Trained once on the channels of ``data.train_x`` with the digits of ``data.train_y`` (``[N, 3]`` or
    ``100 a + 10 b + c``) and cached under ``cache_dir/classifiers`` by a hash of the training images; its held-out
    accuracy on the test split is logged, with a warning below 97 %. ``epochs`` defaults to about 60k images seen
    (at least 2 epochs, at most 40), what the digits CNN gets.
    """
    if data.train_y is None:
        raise UserError(f"{data.name}: stacked mode metrics need per-channel digit labels (train_y), found none")
    n, c, h, w = data.train_x.shape
    if epochs is None:  # Stacked MNIST (180k channels) gets 2 epochs: under a minute on two idle cores
        epochs = max(2, min(40, 60_000 // (n * c)))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "classifiers" / f"{data.name}-{tensor_digest(data.train_x)[:20]}-e{epochs}.pt"
    model = DigitsClassifier()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False)
    x = data.train_x.cpu()
    y = _decode_triples(data.train_y.cpu())
    model = train_classifier(x.reshape(n * c, 1, h, w), y.reshape(-1), epochs=epochs)
    if data.test_x is not None and data.test_y is not None:
        pred = classify_channels(data.test_x.cpu(), model)
        acc = float((pred == _decode_triples(data.test_y.cpu())).float().mean())
        (log.warning if acc < MIN_ACCURACY else log.info)(
            "%s per-channel classifier: held-out accuracy %.4f", data.name, acc
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.requires_grad_(False)


def build_evaluator(
    data,
    *,
    n_samples: int,
    device: str | torch.device = "cpu",
    inception_weights: str | None = None,
    kid_subset_size: int = 1000,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Callable[[Tensor], dict[str, float]]:
    """The evaluation callable for an :class:`~ganlab.data.base.InMemoryData` (see the table in this module).

    Args:
        data: the data module (``setup()`` is called here); the train split is the reference.
        n_samples: generated samples per evaluation; metric names carry it (``fid2k``).
        device: where feature extractors run.
        inception_weights: local Inception-v3 weights (``metrics.inception_weights``); None downloads them.
        kid_subset_size: requested KID subset size (capped at the sample counts).
        cache_dir: reference-statistics cache (default ``$GANLAB_CACHE/fidelity``).
    """
    data.setup()
    common = {"device": device, "kid_subset_size": kid_subset_size, "cache_dir": cache_dir}
    if data.kind == "points":
        centers = getattr(data, "centers", None)
        if centers is None:
            return Evaluator("points", n_samples, **common)
        return Evaluator("points", n_samples, centers=centers, std=float(data.std), **common)

    name = data.name
    if name in DIGITS_NAMES:
        extractor, weights = DIGITS_EXTRACTOR, None
    else:
        extractor, weights = INCEPTION_EXTRACTOR, inception_weights
    weights_identity(extractor, weights)  # a missing weights file fails now, not at the first evaluation
    classifier = None
    if name == "stacked_digits":
        classifier = load_digits_classifier()
    elif name in STACKED_NAMES:
        classifier = channel_classifier_from_labels(data, cache_dir)
    return Evaluator(
        "image",
        n_samples,
        reference=data.train_x.detach().cpu(),
        reference_name=(name, "train"),
        extractor=extractor,
        weights_path=weights,
        classifier=classifier,
        **common,
    )
