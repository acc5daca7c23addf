"""Stacked-digit mode metrics: PacGAN's Table 2 (Lin et al. 2018; the stacked-MNIST protocol of Metz et al. 2017).

Each generated image carries three digits, one per channel; a pretrained classifier labels each channel, and the
triple ``(a, b, c)`` is one of 1,000 modes. ``stacked_modes<N>`` counts the distinct triples among the N generated
samples and ``stacked_kl<N>`` = KL(generated triple histogram || uniform over 1,000), in nats (0 = all 1,000 equally
frequent, log 1000 = 6.91 = a single triple). Both depend on N (PacGAN uses 26,000: ``stacked_modes26k``), hence
the suffix (:func:`~ganlab.metrics.protocol.protocol_name`); with N samples from a perfect generator the mode count
is about 1000 (1 - exp(-N/1000)) and the KL about 999 / (2N) (the bias of a plug-in estimate).

A data set declares these metrics with ``EvalSpec(modes=StackedModes(...))``: the shipped digits CNN labels the
channels of stacked 8x8 digits; ``from_labels=True`` trains a per-channel classifier once from the data set's
labels (Stacked MNIST).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ganlab.errors import UserError
from ganlab.metrics.classifier import (
    MIN_ACCURACY,
    DigitsClassifier,
    load_digits_classifier,
    resolve_weights,
    train_classifier,
)
from ganlab.metrics.modes import kl_to_uniform
from ganlab.metrics.protocol import protocol_name

log = logging.getLogger(__name__)


def triples_to_index(triples: Tensor) -> Tensor:
    """``[N, 3]`` digits -> mode index ``100 a + 10 b + c`` in 0..999."""
    t = triples.long()
    return t[:, 0] * 100 + t[:, 1] * 10 + t[:, 2]


def stacked_mode_stats(labels: Tensor, n_modes: int = 1000) -> dict[str, float]:
    """``stacked_modes<N>`` and ``stacked_kl<N>`` of N predicted labels: triples ``int [N, 3]`` or mode indices
    ``int [N]`` in 0..n_modes-1.

    With no samples the mode count is 0 and the KL ``log n_modes`` (the worst value, kept finite).
    """
    idx = triples_to_index(labels) if labels.dim() == 2 else labels.long()
    idx = idx.cpu()
    n = len(idx)
    modes, kl = protocol_name("stacked_modes", n), protocol_name("stacked_kl", n)
    if n == 0:
        return {modes: 0.0, kl: math.log(n_modes)}
    if int(idx.min()) < 0 or int(idx.max()) >= n_modes:
        raise ValueError(f"mode indices must lie in 0..{n_modes - 1}")
    counts = torch.bincount(idx, minlength=n_modes)
    return {modes: float((counts > 0).sum()), kl: kl_to_uniform(counts, n_modes)}


@torch.no_grad()
def classify_channels(images: Tensor, classifier: DigitsClassifier, batch_size: int = 4096) -> Tensor:
    """Classify every channel of ``uint8 [N, C, H, W]`` images separately: ``int64 [N, C]`` digits.

    For stacked digits (C = 3) the rows are the triples :func:`stacked_mode_stats` counts.
    """
    if images.dim() != 4:
        raise ValueError(f"expected [N, C, H, W] images, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)  # channel j of image i -> row i*C + j
    return classifier.predict(flat, batch_size=batch_size).view(n, c)


def _decode_triples(y: Tensor) -> Tensor:
    """Stacked labels as ``[N, 3]`` digits: given as ``[N, 3]`` or as ``100 a + 10 b + c``."""
    if y.dim() == 2 and y.shape[1] == 3:
        return y.long()
    y = y.long().view(-1)
    return torch.stack([y // 100, y // 10 % 10, y % 10], dim=1)


def channel_classifier_from_labels(
    data: Any, cache_dir: str | os.PathLike[str] | None = None, *, epochs: int | None = None
) -> DigitsClassifier:
    """A per-channel digit classifier for stacked data without shipped weights (``stacked_mnist``).

    Trained once on the channels of ``data.train_x`` with the digits of ``data.train_y`` (``[N, 3]`` or
    ``100 a + 10 b + c``) and cached under ``cache_dir/classifiers`` by a hash of the training images; its held-out
    accuracy on the test split is logged, with a warning below 97 %. ``epochs`` defaults to about 60k images seen
    (at least 2 epochs, at most 40), what the digits CNN gets.
    """
    from ganlab.metrics.fidelity import default_cache_dir, tensor_digest  # torch-fidelity only when needed

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


@dataclass(frozen=True)
class StackedModes:
    """PacGAN Table 2 mode metrics for stacked digits (one digit per channel, 1,000 triples).

    ``from_labels=False``: the shipped digits CNN labels each channel (stacked 8x8 digits). ``from_labels=True``:
    a per-channel classifier trained once from the data set's labels (:func:`channel_classifier_from_labels`).
    """

    from_labels: bool = False

    def prepare(self, data: Any, *, cache_dir: str | os.PathLike[str] | None = None) -> ChannelModes:
        if self.from_labels:
            return ChannelModes(channel_classifier_from_labels(data, cache_dir), weights=None)
        return ChannelModes(load_digits_classifier(), weights=resolve_weights())


@dataclass(frozen=True)
class ChannelModes:
    """What :meth:`StackedModes.prepare` returns: ``samples -> {stacked_modes<N>, stacked_kl<N>}``.

    ``weights``: the file the classifier was loaded from (None: trained from the data set's labels). When it is the
    fidelity extractor's own file (the digits CNN), the evaluator runs the network once and hands the predicted
    channels to :meth:`from_labels` instead of calling this.
    """

    classifier: DigitsClassifier
    weights: Path | None = None

    def __call__(self, samples: Tensor) -> dict[str, float]:
        return stacked_mode_stats(classify_channels(samples.cpu(), self.classifier))

    def from_labels(self, labels: Tensor) -> dict[str, float]:
        """The same metrics from the channels' predicted digits ``int [N, C]`` (e.g. a shared CNN pass)."""
        return stacked_mode_stats(labels)
