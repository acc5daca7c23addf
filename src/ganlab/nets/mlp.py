"""Fully connected G and D for low-dimensional data (the 2-D mixtures, the 1-D demo)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ganlab.nets.base import Discriminator, NormFactory, norm_or_identity, resolve_norm
from ganlab.tricks.base import LayerInsert


class MLPGenerator(nn.Module):
    """``z [n, z_dim] -> x [n, *out_shape]``: ``depth`` hidden ReLU layers of ``width`` units, linear output.

    ``norm`` normalises every hidden layer (``batch``, ``none``, or a trick's factory such as virtual batch norm).
    """

    def __init__(
        self,
        out_shape: tuple[int, ...],
        z_dim: int = 2,
        width: int = 128,
        depth: int = 3,
        norm: str | NormFactory | None = "none",
    ) -> None:
        super().__init__()
        if z_dim < 1 or width < 1 or depth < 0:
            raise ValueError(f"model: z_dim and width must be >= 1, depth >= 0 (got {z_dim}, {width}, {depth})")
        self.out_shape = tuple(out_shape)
        self.z_dim = z_dim
        make_norm = resolve_norm(norm)
        layers: list[nn.Module] = []
        d = z_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), norm_or_identity(make_norm, width, dims=1), nn.ReLU()]
            d = width
        layers += [nn.Linear(d, math.prod(self.out_shape))]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


class MLPDiscriminator(Discriminator):
    """``x -> logit``: ``depth`` hidden LeakyReLU(0.2) layers of ``width`` units, each exposed as a feature.

    ``norm`` normalises every hidden layer but the first (DCGAN's convention; the batch_norm_d trick sets it);
    ``inserts`` are a trick's layers (minibatch discrimination). ``n_outputs = K > 1`` gives K class logits
    ``[n, K]`` instead (the semi-supervised GAN's D).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int = 128,
        depth: int = 3,
        norm: str | NormFactory | None = "none",
        inserts: Sequence[LayerInsert] = (),
        n_outputs: int = 1,
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"model.discriminator: width and depth must be >= 1 (got {width}, {depth})")
        self.set_outputs(n_outputs)
        make_norm = resolve_norm(norm)

        def block(i: int, d_in: int) -> tuple[nn.Module, int]:
            layers: list[nn.Module] = [nn.Linear(d_in, width)]
            if make_norm is not None and i > 0:  # DCGAN convention: no normalisation on D's input layer
                layers.append(make_norm(width, 1))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers), width

        self.flatten = nn.Flatten()
        self._build(depth, block, lambda d: nn.Linear(d, self.n_outputs), math.prod(in_shape), lambda i, w: w, inserts)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return super().forward(self.flatten(x))
