"""Virtual batch normalisation (Salimans et al. 2016 §3.5) for the generator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ganlab.tricks.base import Player, Trick


class VirtualBatchNorm(nn.Module):
    """Normalise each example with the statistics of a fixed reference batch combined with the example itself.

    For example ``x`` and reference batch ``R`` (|R| = N), per channel:
    ``mu = (N mu_R + mu_x) / (N + 1)`` and ``E[x^2] = (N E_R[x^2] + E_x[x^2]) / (N + 1)``, where ``mu_x`` is
    the example's own mean over its spatial positions (for a conv map) or the value itself (for a vector).
    Unlike batch norm, an example's output never depends on the other examples of its batch.

    The reference statistics are refreshed by a reference pass (``reference_mode``) through the network before
    each forward, so they follow the current weights; :class:`ReferenceBatch` runs that pass.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.reference_mode = False
        self.ref_mean: Tensor | None = None
        self.ref_meansq: Tensor | None = None
        self.ref_n = 0

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(*t.shape, *([1] * (x.dim() - t.dim())))

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim()))  # spatial dims of a conv map; none for [n, c]
        mean_x = x.mean(dim=dims) if dims else x  # [n, c]
        meansq_x = x.pow(2).mean(dim=dims) if dims else x.pow(2)  # [n, c]
        if self.reference_mode:
            # the reference batch is normalised with its own statistics, which are kept for the real pass
            self.ref_mean, self.ref_meansq, self.ref_n = mean_x.mean(0), meansq_x.mean(0), x.shape[0]
            mean, meansq = self.ref_mean.expand_as(mean_x), self.ref_meansq.expand_as(meansq_x)
        else:
            if self.ref_mean is None:
                raise RuntimeError("VirtualBatchNorm needs a reference pass before the first forward")
            n = self.ref_n
            mean = (n * self.ref_mean + mean_x) / (n + 1)  # [n, c]
            meansq = (n * self.ref_meansq + meansq_x) / (n + 1)  # [n, c]
        var = (meansq - mean.pow(2)).clamp_min(0.0)
        y = (x - self._view(mean, x)) * torch.rsqrt(self._view(var, x) + self.eps)
        return y * self._view(self.weight[None], x) + self._view(self.bias[None], x)


class ReferenceBatch(nn.Module):
    """G wrapped so that every forward first runs the fixed reference noise ``z_ref`` through it in reference mode
    (which refreshes every :class:`VirtualBatchNorm` layer's statistics under the current weights), then ``z``.

    That doubles the cost of a batch of size |z_ref|, as Salimans et al. note, which is why VBN is used in G only.
    ``z_ref`` is a buffer: fixed at the start, saved in checkpoints.
    """

    def __init__(self, generator: nn.Module, z_ref: Tensor) -> None:
        super().__init__()
        self.inner = generator
        self.z_dim = int(generator.z_dim)
        self.register_buffer("z_ref", z_ref)
        self.vbn_layers = [m for m in generator.modules() if isinstance(m, VirtualBatchNorm)]

    def forward(self, z: Tensor) -> Tensor:
        for m in self.vbn_layers:
            m.reference_mode = True
        try:
            self.inner(self.z_ref)
        finally:
            for m in self.vbn_layers:
                m.reference_mode = False
        return self.inner(z)


class VirtualBatchNormG(Trick):
    """``tricks=[virtual_batch_norm]``: every normalisation layer of G becomes :class:`VirtualBatchNorm`, with a
    reference batch of ``ref_batch_size`` noise vectors drawn once from the configured prior."""

    def __init__(self, ref_batch_size: int = 64) -> None:
        if ref_batch_size < 1:
            raise ValueError(f"tricks.virtual_batch_norm.ref_batch_size must be >= 1 (got {ref_batch_size})")
        self.ref_batch_size = int(ref_batch_size)

    @staticmethod
    def _norm(features: int, dims: int) -> nn.Module:
        return VirtualBatchNorm(features)

    def network_args(self, player: Player) -> dict[str, Any]:
        return {"norm": self._norm} if player == "G" else {}

    def wrap_generator(self, generator: nn.Module, prior: Any) -> nn.Module:
        if not any(isinstance(m, VirtualBatchNorm) for m in generator.modules()):
            raise ValueError("tricks.virtual_batch_norm: G has no normalisation layer to make virtual")
        return ReferenceBatch(generator, prior.sample((self.ref_batch_size, int(generator.z_dim))))
