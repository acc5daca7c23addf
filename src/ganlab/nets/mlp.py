"""Fully connected G and D for low-dimensional data (the 2-D mixtures, the 1-D demo)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ganlab.nets.base import Discriminator
from ganlab.tricks.virtual_batch_norm import ReferencePass, norm_layer


class MLPGenerator(ReferencePass, nn.Module):
    """``z [n, z_dim] -> x [n, *out_shape]``: ``depth`` hidden ReLU layers of ``width`` units, linear output."""

    def __init__(
        self,
        out_shape: tuple[int, ...],
        z_dim: int = 2,
        width: int = 128,
        depth: int = 3,
        batch_norm: bool = False,
        virtual_batch_norm: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.z_dim = z_dim
        kind = self.init_reference(z_dim, virtual_batch_norm) or ("batch" if batch_norm else "none")
        layers: list[nn.Module] = []
        d = z_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), norm_layer(kind, width, dims=1), nn.ReLU()]
            d = width
        layers += [nn.Linear(d, math.prod(self.out_shape))]
        self.net = nn.Sequential(*layers)
        self.collect_vbn()

    def _body(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)

    def forward(self, z: Tensor) -> Tensor:
        self.reference_pass(self._body)
        return self._body(z)


class MLPDiscriminator(Discriminator):
    """``x -> logit``: ``depth`` hidden LeakyReLU(0.2) layers of ``width`` units, each exposed as a feature.

    ``n_outputs = K > 1`` gives K class logits ``[n, K]`` instead (the semi-supervised GAN's D).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int = 128,
        depth: int = 3,
        batch_norm: bool = False,
        minibatch: Mapping[str, Any] | None = None,
        n_outputs: int = 1,
    ) -> None:
        super().__init__()
        self.set_outputs(n_outputs)

        def block(i: int, d_in: int) -> tuple[nn.Module, int]:
            layers: list[nn.Module] = [nn.Linear(d_in, width)]
            if batch_norm and i > 0:  # DCGAN convention: no BN on D's input layer
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers), width

        self.flatten = nn.Flatten()
        self._build(
            depth, block, lambda d: nn.Linear(d, self.n_outputs), math.prod(in_shape), lambda i, w: w, minibatch
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return super().forward(self.flatten(x))
