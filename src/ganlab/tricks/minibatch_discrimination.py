"""Minibatch discrimination (Salimans et al. 2016 §3.2) as a discriminator layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ganlab.tricks.base import LayerInsert, Player, Trick


class MinibatchDiscrimination(nn.Module):
    """Append to each example's features a measure of how close it is to the other examples of its batch.

    With ``f(x_i) in R^A`` (the incoming features, flattened) and a learned ``T in R^{A x B x C}``:
    ``M_i = f(x_i) T in R^{B x C}``, ``c_b(x_i, x_j) = exp(-||M_{i,b} - M_{j,b}||_1)`` and
    ``o(x_i)_b = sum_{j != i} c_b(x_i, x_j)``. The output is ``[f(x_i), o(x_i)]``: B extra features for a flat
    input, or B extra constant channels for a conv feature map ``[n, c, h, w]`` (so the layer can sit after any
    layer of a conv D, not only the penultimate one).

    Cost is O(n^2 B C) per pass; one ``torch.cdist(p=1)`` over the B kernels is about 3x faster than the naive
    broadcast (DESIGN.md §9).
    """

    def __init__(self, in_features: int, n_kernels: int = 100, kernel_dim: int = 5, init_std: float = 0.05) -> None:
        super().__init__()
        if n_kernels < 1 or kernel_dim < 1:
            raise ValueError(
                f"minibatch discrimination needs n_kernels, kernel_dim >= 1 (got {n_kernels}, {kernel_dim})"
            )
        self.in_features, self.n_kernels, self.kernel_dim = in_features, n_kernels, kernel_dim
        self.extra_features = n_kernels  # what the layer appends: B similarity features (or channels)
        self.T = nn.Parameter(torch.randn(in_features, n_kernels * kernel_dim) * init_std)  # [A, B*C]

    def similarity(self, x: Tensor) -> Tensor:
        """``o(x)``: ``[n, B]`` closeness of each example to the rest of the batch."""
        n = x.shape[0]
        f = x.reshape(n, -1)  # [n, A]
        m = (f @ self.T).view(n, self.n_kernels, self.kernel_dim)  # [n, B, C]
        m = m.transpose(0, 1).contiguous()  # [B, n, C]
        dist = torch.cdist(m, m, p=1)  # [B, n, n]   ||M_{i,b} - M_{j,b}||_1
        c = torch.exp(-dist)  # [B, n, n]   c_b(x_i, x_j); the diagonal is exp(0) = 1
        o = c.sum(dim=2) - 1.0  # [B, n]      sum over j != i
        return o.t()  # [n, B]

    def forward(self, x: Tensor) -> Tensor:
        o = self.similarity(x)  # [n, B]
        if x.dim() == 2:
            return torch.cat([x, o], dim=1)  # [n, A + B]
        n, _, h, w = x.shape
        return torch.cat([x, o[:, :, None, None].expand(n, self.n_kernels, h, w)], dim=1)  # [n, c + B, h, w]

    def extra_repr(self) -> str:
        return f"A={self.in_features}, B={self.n_kernels}, C={self.kernel_dim}"


class MinibatchDiscriminationD(Trick):
    """``tricks=[minibatch_discrimination]``: a :class:`MinibatchDiscrimination` layer with ``n_kernels`` (B) and
    ``kernel_dim`` (C) after each of D's hidden ``layers`` (``-1``: the penultimate layer, as in Salimans et al.)."""

    def __init__(self, layers: Sequence[int] = (-1,), n_kernels: int = 100, kernel_dim: int = 5) -> None:
        if len(layers) == 0:
            raise ValueError("tricks.minibatch_discrimination.layers must name at least one D layer")
        if n_kernels < 1 or kernel_dim < 1:
            raise ValueError(
                "tricks.minibatch_discrimination: n_kernels and kernel_dim must be >= 1 "
                f"(got {n_kernels}, {kernel_dim})"
            )
        self.layers, self.n_kernels, self.kernel_dim = [int(i) for i in layers], int(n_kernels), int(kernel_dim)

    def _make(self, in_features: int) -> nn.Module:
        return MinibatchDiscrimination(in_features, self.n_kernels, self.kernel_dim)

    def network_args(self, player: Player) -> dict[str, Any]:
        return {"inserts": [LayerInsert(self.layers, self._make)]} if player == "D" else {}
