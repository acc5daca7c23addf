"""Generated low-dimensional data: PacGAN's 2-D Gaussian mixtures (Lin et al. 2018, Table 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ganlab.data.base import EvalSpec, InMemoryData
from ganlab.metrics.modes import MixtureModes


class GaussianMixture2D(InMemoryData):
    """Equal-weight mixture of isotropic Gaussians at ``centers`` with standard deviation ``std``.

    A fixed pool of ``n_train`` points (and ``n_test`` held-out ones) is drawn once with ``data_seed``, so the
    data set is the same for every run and seed; the label of a point is the index of its mode. A subclass sets
    ``name``, ``centers`` and ``std``; PacGAN's Table 1 metrics on 2,500 samples come with it.
    """

    kind = "points"
    n_preview = 1000  # points in each scatter plot
    evaluation = EvalSpec(samples=2500, modes=MixtureModes(), preview="scatter")  # PacGAN's Table 1 protocol
    batch_size = 256  # measured: 97.5 % high-quality ring samples at 256 vs 93.9 % at 64 (10k steps)

    def __init__(self, n_train: int = 100_000, n_test: int = 2_500, data_seed: int = 1234) -> None:
        super().__init__()
        self.n_train, self.n_test, self.data_seed = n_train, n_test, data_seed
        self.num_classes = len(self.centers)

    centers: Tensor
    std: float

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.data_seed)
        k = len(self.centers)

        def draw(n: int) -> tuple[Tensor, Tensor]:
            y = torch.randint(k, (n,), generator=g)
            x = self.centers[y] + self.std * torch.randn(n, 2, generator=g)
            return x, y

        train_x, train_y = draw(self.n_train)
        test_x, test_y = draw(self.n_test)
        return train_x, train_y, test_x, test_y


class Ring8(GaussianMixture2D):
    """Eight Gaussians on the unit circle, std 0.01 (PacGAN's 2D-ring)."""

    name = "ring8"
    centers = torch.tensor(
        [[math.cos(2 * math.pi * i / 8), math.sin(2 * math.pi * i / 8)] for i in range(8)],
        dtype=torch.float32,
    )
    std = 0.01


class Grid25(GaussianMixture2D):
    """A 5x5 grid of Gaussians at (-4 + 2i, -4 + 2j), std 0.05 (PacGAN's 2D-grid)."""

    name = "grid25"
    centers = torch.tensor([[-4.0 + 2 * i, -4.0 + 2 * j] for i in range(5) for j in range(5)], dtype=torch.float32)
    std = 0.05


class Gauss1D(InMemoryData):
    """A 1-D Gaussian N(mean, std^2): the setting of Goodfellow et al. 2014, Figure 1.

    ``frames`` asks the sample-grid callback for that many frames of the D(x)-over-p_data-and-p_g plot per run
    (assembled into ``samples/demo.gif``).
    """

    name = "gauss1d"
    kind = "points"
    evaluation = EvalSpec(preview="density")  # no metrics: the Figure-1 plot is the result
    n_preview = 5000  # fixed-noise samples in each frame's histogram of p_g

    def __init__(
        self,
        mean: float = 2.0,
        std: float = 0.5,
        n_train: int = 100_000,
        n_test: int = 2_500,
        data_seed: int = 1234,
        frames: int = 40,
    ) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"data.std must be > 0 (got {std})")
        self.mean, self.std, self.n_train, self.n_test, self.data_seed = mean, std, n_train, n_test, data_seed
        self.frames = frames

    def load(self) -> tuple[Tensor, None, Tensor, None]:
        g = torch.Generator().manual_seed(self.data_seed)
        train = self.mean + self.std * torch.randn(self.n_train, 1, generator=g)
        test = self.mean + self.std * torch.randn(self.n_test, 1, generator=g)
        return train, None, test, None
