"""Fully connected G and D for low-dimensional data (the 2-D mixtures, the 1-D demo)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ganlab.nets.base import Discriminator


class MLPGenerator(nn.Module):
    """``z [n, z_dim] -> x [n, *out_shape]``: ``depth`` hidden ReLU layers of ``width`` units, linear output."""

    def __init__(
        self,
        out_shape: tuple[int, ...],
        z_dim: int = 2,
        width: int = 128,
        depth: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.z_dim = z_dim
        layers: list[nn.Module] = []
        d = z_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width)]
            if batch_norm:
                layers += [nn.BatchNorm1d(width)]
            layers += [nn.ReLU()]
            d = width
        layers += [nn.Linear(d, math.prod(self.out_shape))]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


class MLPDiscriminator(Discriminator):
    """``x -> logit``: ``depth`` hidden LeakyReLU(0.2) layers of ``width`` units, each exposed as a feature."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int = 128,
        depth: int = 3,
        batch_norm: bool = False,
        minibatch: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()

        def block(i: int, d_in: int) -> tuple[nn.Module, int]:
            layers: list[nn.Module] = [nn.Linear(d_in, width)]
            if batch_norm and i > 0:  # DCGAN convention: no BN on D's input layer
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers), width

        self.flatten = nn.Flatten()
        self._build(depth, block, lambda d: nn.Linear(d, 1), math.prod(in_shape), lambda i, w: w, minibatch)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return super().forward(self.flatten(x))
