"""Generated low-dimensional data: 2-D Gaussian mixtures as parameters (rings and grids; PacGAN's ring8 and grid25,
Lin et al. 2018 Table 1, are presets) and the 1-D Gaussian of Goodfellow et al.'s Figure 1."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ganlab.data.base import EvalSpec, InMemoryData
from ganlab.metrics.modes import MixtureModes
from ganlab.metrics.protocol import protocol_name


class GaussianMixture2D(InMemoryData):
    """Equal-weight mixture of isotropic Gaussians at ``centers`` with standard deviation ``std``.

    A fixed pool of ``n_train`` points (and ``n_test`` held-out ones) is drawn once with ``data_seed``, so the
    data set is the same for every run and seed; the label of a point is the index of its mode. A subclass sets
    ``name``, ``centers`` and ``std`` (:class:`Ring`, :class:`Grid`); PacGAN's Table 1 metrics on 2,500 samples
    come with it, for any centres and std.
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


def ring_centers(n_modes: int, radius: float) -> Tensor:
    """``n_modes`` points evenly spaced on a circle of ``radius`` around the origin, the first at angle 0."""
    return torch.tensor(
        [
            [radius * math.cos(2 * math.pi * i / n_modes), radius * math.sin(2 * math.pi * i / n_modes)]
            for i in range(n_modes)
        ],
        dtype=torch.float32,
    )


def grid_centers(side: int, spacing: float) -> Tensor:
    """A ``side`` x ``side`` square grid with ``spacing`` between neighbours, centred on the origin."""
    offset = -(side - 1) * spacing / 2
    return torch.tensor(
        [[offset + spacing * i, offset + spacing * j] for i in range(side) for j in range(side)], dtype=torch.float32
    )


def _check(name: str, **values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(f"data ({name}): " + ", ".join(f"{k} must be > 0 (got {v})" for k, v in bad.items()))


class Ring(GaussianMixture2D):
    """``data=ring``: ``n_modes`` Gaussians of standard deviation ``std`` evenly spaced on a circle of ``radius``.

    ``name`` names the data set in run records and reports (default ``ring<n>_r<radius>_std<std>``; the
    ``ring8`` preset names itself).
    """

    def __init__(
        self,
        n_modes: int = 8,
        radius: float = 1.0,
        std: float = 0.01,
        n_train: int = 100_000,
        n_test: int = 2_500,
        data_seed: int = 1234,
        name: str | None = None,
    ) -> None:
        _check("ring", n_modes=n_modes, radius=radius, std=std)
        self.centers, self.std = ring_centers(int(n_modes), float(radius)), float(std)
        super().__init__(n_train, n_test, data_seed)
        self.name = name or f"ring{n_modes}_r{radius:g}_std{std:g}"


class Grid(GaussianMixture2D):
    """``data=grid``: a ``side`` x ``side`` grid of Gaussians of standard deviation ``std``, ``spacing`` apart and
    centred on the origin.

    ``name`` names the data set in run records and reports (default ``grid<side^2>_sp<spacing>_std<std>``; the
    ``grid25`` preset names itself).
    """

    # measured on grid25 (ns_then_minimax, 10k G steps, seeds 0-4): 95.9 % high-quality samples on average at 512
    # against 93.8 % at 256, whose slowest seeds were still climbing at the last step (85.2 % on seed 3)
    batch_size = 512

    def __init__(
        self,
        side: int = 5,
        spacing: float = 2.0,
        std: float = 0.05,
        n_train: int = 100_000,
        n_test: int = 2_500,
        data_seed: int = 1234,
        name: str | None = None,
    ) -> None:
        _check("grid", side=side, spacing=spacing, std=std)
        self.centers, self.std = grid_centers(int(side), float(spacing)), float(std)
        super().__init__(n_train, n_test, data_seed)
        self.name = name or f"grid{side * side}_sp{spacing:g}_std{std:g}"


class Ring8(Ring):
    """PacGAN's 2D-ring, the ``ring8`` preset: eight Gaussians on the unit circle, std 0.01."""

    name = "ring8"
    centers = ring_centers(8, 1.0)
    std = 0.01

    def __init__(self, n_train: int = 100_000, n_test: int = 2_500, data_seed: int = 1234) -> None:
        super().__init__(8, 1.0, 0.01, n_train, n_test, data_seed, name="ring8")


class Grid25(Grid):
    """PacGAN's 2D-grid, the ``grid25`` preset: 25 Gaussians at (-4 + 2i, -4 + 2j), std 0.05."""

    name = "grid25"
    centers = grid_centers(5, 2.0)
    std = 0.05

    def __init__(self, n_train: int = 100_000, n_test: int = 2_500, data_seed: int = 1234) -> None:
        super().__init__(5, 2.0, 0.05, n_train, n_test, data_seed, name="grid25")


class Gauss1D(InMemoryData):
    """A 1-D Gaussian N(mean, std^2): the setting of Goodfellow et al. 2014, Figure 1.

    ``frames`` asks the sample-grid callback for that many frames of the D(x)-over-p_data-and-p_g plot per run
    (assembled into ``samples/demo.gif``).
    """

    name = "gauss1d"
    kind = "points"
    batch_size = 512  # measured: final KS 0.038-0.043 over 3 seeds at 512 vs 0.03-0.06 at 256 (D width 128)
    # k = 3 D updates per G update: Figure 1 assumes D near its optimum between G steps; at k = 1 the game circles
    # the equilibrium (KS swinging 0.045-0.11) and the final KS, seeds 0/1/2, was 0.054/0.044/0.040; at k = 3 it
    # was 0.033/0.025/0.037 (README, the 1-D demo)
    d_steps = 3
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

    def frame_metrics(self, samples: Tensor) -> dict[str, float]:
        """p_g's distance to p_data at a frame: the Kolmogorov-Smirnov statistic ``sup_x |F_n(x) - Phi(x)|`` of
        the samples against the N(mean, std^2) CDF, named with the sample count (``ks5k`` for 5,000)."""
        x = samples.detach().double().cpu().flatten().sort().values
        n = len(x)
        cdf = torch.special.ndtr((x - self.mean) / self.std)
        steps = torch.arange(n + 1, dtype=torch.float64) / n  # F_n just after / before each sample
        ks = torch.maximum(steps[1:] - cdf, cdf - steps[:-1]).max()
        return {protocol_name("ks", n): float(ks)}

    def load(self) -> tuple[Tensor, None, Tensor, None]:
        g = torch.Generator().manual_seed(self.data_seed)
        train = self.mean + self.std * torch.randn(self.n_train, 1, generator=g)
        test = self.mean + self.std * torch.randn(self.n_test, 1, generator=g)
        return train, None, test, None
