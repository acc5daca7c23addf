"""DCGAN-style convolutional G and D (Radford et al. 2016) whose depth follows the image resolution.

A resolution ``r`` (8, 16, 32, 64, ...) gives ``log2(r / 4)`` stride-2 stages between 4x4 and ``r x r``:
one for the 8x8 digits, three for CIFAR-10, four for 64x64 folders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ganlab.nets.base import Discriminator, NormFactory, norm_or_identity, resolve_norm
from ganlab.tricks.base import LayerInsert


def _stages(resolution: int) -> int:
    n = int(math.log2(resolution)) - 2
    if resolution < 8 or 2 ** (n + 2) != resolution:
        raise ValueError(f"DCGAN nets need a power-of-two resolution >= 8 (got {resolution})")
    return n


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(
            f"model=dcgan needs image data [channels, height, width] (got examples of shape {tuple(shape)}): "
            "use model=mlp for points"
        )
    return shape[0], shape[1], shape[2]


def to_channels_last(net: nn.Module) -> nn.Module:
    """``net``'s 4-D weights in channels_last (NHWC) memory order, in place: what cuDNN's and oneDNN's fastest
    convolutions use (tensor cores on GPU), so no layout conversion runs around each conv. Values are unchanged."""
    return net.to(memory_format=torch.channels_last)


def maybe_compile(net: nn.Module, compile: bool) -> nn.Module:
    """``model.compile``: ``torch.compile`` the forward in place (``nn.Module.compile``: state-dict keys and
    checkpoints stay as they are). Opt-in: compiling takes tens of seconds and needs a C++ compiler."""
    if compile:
        net.compile()
    return net


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


class DCGANGenerator(nn.Module):
    """``z [n, z_dim] -> x [n, c, r, r]`` in [-1, 1].

    Shapes for ``r = 32, width = w``: z -> [8w, 4, 4] -> [4w, 8, 8] -> [2w, 16, 16] -> [w, 32, 32] -> [c, 32, 32].
    Each stage is ConvTranspose(4, stride 2) + norm + ReLU; a 3x3 conv and tanh give the image. ``norm`` is batch
    norm in DCGAN; the virtual_batch_norm trick replaces it with its own factory.
    """

    def __init__(
        self,
        out_shape: tuple[int, ...],
        z_dim: int = 64,
        width: int = 64,
        norm: str | NormFactory | None = "batch",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if z_dim < 1 or width < 1:
            raise ValueError(f"model: z_dim and width must be >= 1 (got {z_dim}, {width})")
        c, h, w = _image_shape(out_shape)
        if h != w:
            raise ValueError(f"DCGAN nets need square images (got {h}x{w})")
        n = _stages(h)
        self.z_dim = z_dim
        ch = [width * 2 ** (n - i) for i in range(n + 1)]  # channels at 4x4, 8x8, ..., r x r
        make_norm = resolve_norm(norm)

        def norm_of(c: int) -> nn.Module:
            return norm_or_identity(make_norm, c, dims=2)

        self.stem = nn.Sequential(
            nn.Linear(z_dim, ch[0] * 16), nn.Unflatten(1, (ch[0], 4, 4)), norm_of(ch[0]), nn.ReLU()
        )
        stages: list[nn.Module] = []
        for i in range(n):
            stages += [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False), norm_of(ch[i + 1]), nn.ReLU()]
        self.stages = nn.Sequential(*stages)
        self.to_image = nn.Sequential(nn.Conv2d(ch[-1], c, 3, 1, 1), nn.Tanh())
        dcgan_init(self)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            to_channels_last(self)
        maybe_compile(self, compile)

    def forward(self, z: Tensor) -> Tensor:
        h = self.stem(z)  # [n, 8w, 4, 4] (r = 32)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.to_image(self.stages(h))


class DCGANDiscriminator(Discriminator):
    """``x [n, c, r, r] -> logit``; hidden blocks (each exposed as a feature):

    block 0: 3x3 conv c -> w at r x r; blocks 1..n: Conv(4, stride 2) doubling channels down to 4x4;
    head: flatten + linear. ``norm`` (the batch_norm_d trick) on every block but the first, as in DCGAN;
    ``inserts`` are a trick's layers (minibatch discrimination: after the last block only, its output is
    flat). ``n_outputs = K > 1`` gives K class logits ``[n, K]`` (the semi-supervised GAN's D).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        width: int = 64,
        norm: str | NormFactory | None = "none",
        inserts: Sequence[LayerInsert] = (),
        n_outputs: int = 1,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"model.discriminator.width must be >= 1 (got {width})")
        self.set_outputs(n_outputs)
        make_norm = resolve_norm(norm)
        c, h, _ = _image_shape(in_shape)
        n = _stages(h)
        sizes = [h // 2**i for i in range(n + 1)]  # spatial size after block i

        def block(i: int, c_in: int) -> tuple[nn.Module, int]:
            if i == 0:
                return nn.Sequential(nn.Conv2d(c_in, width, 3, 1, 1), nn.LeakyReLU(0.2)), width
            c_out = width * 2**i
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=make_norm is None)]
            if make_norm is not None:
                layers.append(make_norm(c_out, 2))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers), c_out

        def head(features: int) -> nn.Module:  # [n, c_last, 4, 4] (or flat features after an inserted layer)
            return nn.Sequential(nn.Flatten(), nn.Linear(features, self.n_outputs))

        self._build(n + 1, block, head, c, lambda i, ch: ch * sizes[i] ** 2, inserts, maps=True)
        dcgan_init(self)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            to_channels_last(self)
        maybe_compile(self, compile)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.channels_last:  # [n, c, r, r] in NHWC order; Flatten in the head still reads it as NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)
