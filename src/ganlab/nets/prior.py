"""The prior p_z of the generator's noise (``model.noise``)."""

from __future__ import annotations

import torch
from torch import Tensor

PRIORS = ("normal", "uniform")


class Prior:
    """``normal``: z ~ N(0, I); ``uniform``: z ~ U[-1, 1] (Goodfellow et al.'s Figure 1)."""

    def __init__(self, kind: str = "normal") -> None:
        if kind not in PRIORS:
            raise ValueError(f"model.noise must be normal or uniform (got {kind!r})")
        self.kind = kind

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """Noise of ``shape`` from ``generator`` (its device), or from the global stream on the CPU."""
        device = generator.device if generator is not None else None
        if self.kind == "uniform":
            return torch.rand(shape, generator=generator, device=device).mul_(2).sub_(1)
        return torch.randn(shape, generator=generator, device=device)
