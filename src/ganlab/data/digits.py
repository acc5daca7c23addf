"""scikit-learn's bundled 8x8 handwritten digits: the built-in image data set (no download)."""

from __future__ import annotations

import torch
from torch import Tensor

from ganlab.data.base import EvalSpec, InMemoryData
from ganlab.metrics.protocol import DIGITS_EXTRACTOR


def load_digits_uint8() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fixed train/test split of sklearn's digits as ``uint8 [N, 1, 8, 8]`` images and int64 labels.

    Pixel values 0..16 map to 0..255 (17 distinct levels, nothing lost). The split (80/20, stratified,
    ``random_state=0``: 1,437 train / 360 test) never depends on the run's seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().mul_(255.0 / 16.0).round_().to(torch.uint8)
    images = images.unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    idx = torch.arange(len(labels)).numpy()
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=bunch.target)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return images[tr], labels[tr], images[te], labels[te]


class Digits(InMemoryData):
    """1,797 8x8 grey digits in 10 classes, 1,437 for training and 360 held out."""

    name = "digits"
    kind = "image"
    num_classes = 10
    evaluation = EvalSpec(features=DIGITS_EXTRACTOR)  # FID/IS/KID/PR on 2,000 samples with the shipped CNN

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return load_digits_uint8()
