"""Stacked digits: three of scikit-learn's 8x8 digits as the channels of one image (1,000 modes, no download).

The small, offline counterpart of Stacked MNIST (Metz et al. 2017; Lin et al. 2018).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ganlab.data.base import EvalSpec, InMemoryData
from ganlab.data.digits import load_digits_uint8
from ganlab.data.torchvision_sets import stack_three
from ganlab.metrics.protocol import DIGITS_EXTRACTOR
from ganlab.metrics.stacked import StackedModes


class StackedDigits(InMemoryData):
    """Images of three digits stacked as channels, ``uint8 [N, 3, 8, 8]``, label ``100*d0 + 10*d1 + d2``.

    Each channel is drawn uniformly at random from the digits train split (for the ``n_train`` training
    examples) or test split (for the ``n_test`` held-out ones) with a generator seeded by ``data_seed``, so
    the data set is the same for every run.
    """

    name = "stacked_digits"
    kind = "image"
    num_classes = 1000
    # PacGAN Table 2 counts modes among 26,000 samples; the shipped digits CNN labels each channel and gives
    # the FID/IS/KID/PR features
    evaluation = EvalSpec(samples=26_000, interim_samples=2_000, features=DIGITS_EXTRACTOR, modes=StackedModes())

    def __init__(self, n_train: int = 50_000, n_test: int = 5_000, data_seed: int = 1234) -> None:
        super().__init__()
        self.n_train, self.n_test, self.data_seed = n_train, n_test, data_seed

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        train_x, train_y, test_x, test_y = load_digits_uint8()
        g = torch.Generator().manual_seed(self.data_seed)
        sx, sy = stack_three(train_x, train_y, self.n_train, g)
        tx, ty = stack_three(test_x, test_y, self.n_test, g)
        return sx, sy, tx, ty
