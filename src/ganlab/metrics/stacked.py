"""Stacked-digit mode metrics: PacGAN's Table 2 (Lin et al. 2018; the stacked-MNIST protocol of Metz et al. 2017).

Each generated image carries three digits, one per channel; a pretrained classifier labels each channel, and the
triple ``(a, b, c)`` is one of 1,000 modes. ``modes`` counts the distinct triples among the generated samples and
``kl`` = KL(generated triple histogram || uniform over 1,000), in nats (0 = all 1,000 equally frequent,
log 1000 = 6.91 = a single triple). Both depend on the number of samples (PacGAN uses 26,000), so callers should
fix it; with N samples from a perfect generator ``modes`` is about 1000 (1 - exp(-N/1000)) and ``kl`` about
999 / (2N) (the bias of a plug-in estimate).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ganlab.metrics.classifier import DigitsClassifier
from ganlab.metrics.modes import kl_to_uniform


def triples_to_index(triples: Tensor) -> Tensor:
    """``[N, 3]`` digits -> mode index ``100 a + 10 b + c`` in 0..999."""
    t = triples.long()
    return t[:, 0] * 100 + t[:, 1] * 10 + t[:, 2]


def stacked_mode_stats(labels: Tensor, n_modes: int = 1000) -> dict[str, float]:
    """``modes`` and ``kl`` of predicted labels: triples ``int [N, 3]`` or mode indices ``int [N]`` in 0..n_modes-1.

    With no samples ``modes`` is 0 and ``kl`` is ``log n_modes`` (the worst value, kept finite).
    """
    idx = triples_to_index(labels) if labels.dim() == 2 else labels.long()
    idx = idx.cpu()
    if len(idx) == 0:
        return {"modes": 0.0, "kl": math.log(n_modes)}
    if int(idx.min()) < 0 or int(idx.max()) >= n_modes:
        raise ValueError(f"mode indices must lie in 0..{n_modes - 1}")
    counts = torch.bincount(idx, minlength=n_modes)
    return {"modes": float((counts > 0).sum()), "kl": kl_to_uniform(counts, n_modes)}


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
