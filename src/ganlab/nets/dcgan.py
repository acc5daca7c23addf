"""DCGAN-style convolutional G and D (Radford et al. 2016) whose depth follows the image resolution.

A resolution ``r`` (8, 16, 32, 64, ...) gives ``log2(r / 4)`` stride-2 stages between 4x4 and ``r x r``:
one for the 8x8 digits, three for CIFAR-10, four for 64x64 folders.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ganlab.nets.base import Discriminator
from ganlab.tricks.virtual_batch_norm import ReferencePass, norm_layer


def _stages(resolution: int) -> int:
    n = int(math.log2(resolution)) - 2
    if resolution < 8 or 2 ** (n + 2) != resolution:
        raise ValueError(f"DCGAN nets need a power-of-two resolution >= 8 (got {resolution})")
    return n


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv/linear weights ~ N(0, 0.02), BN scale ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(ReferencePass, nn.Module):
    """``z [n, z_dim] -> x [n, c, r, r]`` in [-1, 1].

    Shapes for ``r = 32, width = w``: z -> [8w, 4, 4] -> [4w, 8, 8] -> [2w, 16, 16] -> [w, 32, 32] -> [c, 32, 32].
    Each stage is ConvTranspose(4, stride 2) + BN + ReLU; a 3x3 conv and tanh give the image. With
    ``virtual_batch_norm`` (the trick's settings) every BN becomes virtual batch norm.
    """

    def __init__(
        self,
        out_shape: tuple[int, ...],
        z_dim: int = 64,
        width: int = 64,
        batch_norm: bool = True,
        virtual_batch_norm: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        c, h, w = out_shape
        if h != w:
            raise ValueError(f"DCGAN nets need square images (got {h}x{w})")
        n = _stages(h)
        self.z_dim = z_dim
        ch = [width * 2 ** (n - i) for i in range(n + 1)]  # channels at 4x4, 8x8, ..., r x r
        kind = self.init_reference(z_dim, virtual_batch_norm) or ("batch" if batch_norm else "none")

        def norm(c: int) -> nn.Module:
            return norm_layer(kind, c, dims=2)

        self.stem = nn.Sequential(nn.Linear(z_dim, ch[0] * 16), nn.Unflatten(1, (ch[0], 4, 4)), norm(ch[0]), nn.ReLU())
        stages: list[nn.Module] = []
        for i in range(n):
            stages += [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False), norm(ch[i + 1]), nn.ReLU()]
        self.stages = nn.Sequential(*stages)
        self.to_image = nn.Sequential(nn.Conv2d(ch[-1], c, 3, 1, 1), nn.Tanh())
        dcgan_init(self)
        self.collect_vbn()

    def _body(self, z: Tensor) -> Tensor:
        return self.to_image(self.stages(self.stem(z)))

    def forward(self, z: Tensor) -> Tensor:
        self.reference_pass(self._body)
        return self._body(z)


class DCGANDiscriminator(Discriminator):
    """``x [n, c, r, r] -> logit``; hidden blocks (each exposed as a feature):

    block 0: 3x3 conv c -> w at r x r; blocks 1..n: Conv(4, stride 2) doubling channels down to 4x4;
    head: flatten + linear. BN (``batch_norm``) on every block but the first, as in DCGAN. ``n_outputs = K > 1``
    gives K class logits ``[n, K]`` (the semi-supervised GAN's D).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int = 64,
        batch_norm: bool = True,
        minibatch: Mapping[str, Any] | None = None,
        n_outputs: int = 1,
    ) -> None:
        super().__init__()
        self.set_outputs(n_outputs)
        c, h, _ = in_shape
        n = _stages(h)
        sizes = [h // 2**i for i in range(n + 1)]  # spatial size after block i

        def block(i: int, c_in: int) -> tuple[nn.Module, int]:
            if i == 0:
                return nn.Sequential(nn.Conv2d(c_in, width, 3, 1, 1), nn.LeakyReLU(0.2)), width
            c_out = width * 2**i
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers), c_out

        def head(c_last: int) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(c_last * 16, self.n_outputs))

        self._build(n + 1, block, head, c, lambda i, ch: ch * sizes[i] ** 2, minibatch)
        dcgan_init(self)
