"""Spectral normalisation of D's weights (Miyato et al. 2018): every linear and conv layer of D divides its
weight by an estimate of its largest singular value, so D is (about) 1-Lipschitz per layer.

Not one of Salimans et al.'s tricks; it bounds how sharply D can change between nearby samples, the same
concern as their minibatch features and gradient-based fixes that followed. It acts on D's weights only (never on
the objective), so every arm gets it alike. The layers inserted by other tricks (minibatch discrimination's ``T``)
are left as they are: their own scale is their initialisation's business.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ganlab.tricks.base import Trick


class SpectralNormD(Trick):
    """``tricks=[spectral_norm]``: spectral normalisation (``n_power_iterations`` per training forward pass) on
    every ``nn.Linear`` and ``nn.Conv2d`` of D, the output layer included."""

    def __init__(self, n_power_iterations: int = 1) -> None:
        if n_power_iterations < 1:
            raise ValueError(f"tricks.spectral_norm.n_power_iterations must be >= 1 (got {n_power_iterations})")
        self.n_power_iterations = int(n_power_iterations)

    def setup(self, module: Any) -> None:
        layers = [m for m in module.D.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not layers:
            raise ValueError("tricks.spectral_norm: D has no linear or conv layer to normalise")
        for layer in layers:
            spectral_norm(layer, n_power_iterations=self.n_power_iterations)
