"""An exponential moving average of G's weights (Yazıcı et al. 2019, "The unusual effectiveness of averaging in
GAN training"; Karras et al.'s G_ema): training uses G's live weights, every sample a user sees uses the average.

Not one of Salimans et al.'s tricks, but the same family as their historical averaging (§3.3): an average of past
parameters. Historical averaging *penalises* the distance to the average during training; this trick leaves
training untouched and *evaluates* the average, which damps the oscillation of the last updates instead of
reporting wherever the game happened to stop. It acts on G alone and never on the objective, so every arm gets it
alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ganlab.tricks.base import Player, Trick


class AveragedGenerator(nn.Module):
    """G with an exponential moving average of its parameters held as buffers (checkpointed, moved with the
    module, never trained, never in ``parameters()``).

    In training mode the forward pass is the live G's (what the game trains); in eval mode (sampling, evaluation,
    sample grids, ``src/generate.py``) it is G's with the averaged parameters. Buffers of G (batch-norm running
    statistics) are G's own in both modes.

    The average after update ``t`` (1-based) is ``ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t`` with
    ``beta_t = min(decay, (1 + t) / (10 + t))``: the short early horizon keeps the average from remembering the
    random initialisation for ~1/(1 - decay) updates.
    """

    def __init__(self, generator: nn.Module, decay: float) -> None:
        super().__init__()
        self.inner = generator
        self.z_dim = int(generator.z_dim)
        self.decay = float(decay)
        self.names = [name for name, _ in generator.named_parameters()]
        for i, p in enumerate(generator.parameters()):
            self.register_buffer(f"ema{i}", p.detach().clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def averaged(self) -> list[Tensor]:
        """The averaged parameters, in the order of ``inner.parameters()``."""
        return [getattr(self, f"ema{i}") for i in range(len(self.names))]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the live parameters into the average (one foreach call over all tensors; no host sync: the decay
        schedule reads a device counter)."""
        self.updates += 1
        t = self.updates.to(torch.float32)
        beta = torch.clamp((1 + t) / (10 + t), max=self.decay)
        live = [p.detach() for p in self.inner.parameters()]
        # the tensor-weights overload: a 0-dim tensor where the Scalar overload wants a number is read by the host
        weight = (1 - beta).to(live[0].dtype)
        torch._foreach_lerp_(self.averaged(), live, [weight] * len(live))

    def forward(self, z: Tensor) -> Tensor:
        if self.training:
            return self.inner(z)
        return functional_call(self.inner, dict(zip(self.names, self.averaged(), strict=True)), (z,))


class GeneratorEMA(Trick):
    """``tricks=[ema]``: evaluate and sample an exponential moving average of G's weights (decay ``decay`` per G
    update); training is unchanged."""

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"tricks.ema.decay must be in [0, 1) (got {decay})")
        self.decay = float(decay)
        self.wrapped: AveragedGenerator | None = None

    def wrap_generator(self, generator: nn.Module, prior: Any) -> nn.Module:
        self.wrapped = AveragedGenerator(generator, self.decay)
        return self.wrapped

    def after_update(self, player: Player, net: nn.Module) -> None:
        if player == "G" and self.wrapped is not None:
            self.wrapped.update()
