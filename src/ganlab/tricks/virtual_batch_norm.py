"""Virtual batch normalisation (Salimans et al. 2016 §3.5) for the generator."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VirtualBatchNorm(nn.Module):
    """Normalise each example with the statistics of a fixed reference batch combined with the example itself.

    For example ``x`` and reference batch ``R`` (|R| = N), per channel:
    ``mu = (N mu_R + mu_x) / (N + 1)`` and ``E[x^2] = (N E_R[x^2] + E_x[x^2]) / (N + 1)``, where ``mu_x`` is
    the example's own mean over its spatial positions (for a conv map) or the value itself (for a vector).
    Unlike batch norm, an example's output never depends on the other examples of its batch.

    The reference statistics are refreshed by a reference pass (``reference_mode``) through the network before
    each forward, so they follow the current weights; the module holding the layers runs that pass
    (:class:`ReferencePass`).
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


def norm_layer(kind: str, num_features: int, dims: int) -> nn.Module:
    """The normalisation of a generator layer: ``batch``, ``virtual`` (VBN) or ``none``."""
    if kind == "batch":
        return nn.BatchNorm2d(num_features) if dims == 2 else nn.BatchNorm1d(num_features)
    if kind == "virtual":
        return VirtualBatchNorm(num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r} (batch | virtual | none)")


class ReferencePass:
    """Mixin for generators with :class:`VirtualBatchNorm` layers: ``z_ref`` (a buffer fixed at construction,
    saved in checkpoints) is run through the network in reference mode before every forward. That doubles the
    cost of a batch of size |z_ref|, as Salimans et al. note, which is why VBN is used in G only."""

    def init_reference(self, z_dim: int, vbn: dict | None) -> str:
        """Register ``z_ref`` when ``vbn`` (the trick's settings) is given; return the norm kind to use."""
        self._vbn_layers: list[VirtualBatchNorm] = []
        if vbn is None:
            return ""
        self.register_buffer("z_ref", torch.randn(int(vbn.get("ref_batch_size", 64)), z_dim))
        return "virtual"

    def collect_vbn(self) -> None:
        self._vbn_layers = [m for m in self.modules() if isinstance(m, VirtualBatchNorm)]

    def reference_pass(self, body) -> None:
        if not self._vbn_layers:
            return
        for m in self._vbn_layers:
            m.reference_mode = True
        try:
            body(self.z_ref)
        finally:
            for m in self._vbn_layers:
                m.reference_mode = False
