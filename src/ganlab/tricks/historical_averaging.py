"""Historical averaging (Salimans et al. 2016 §3.3): each player pays for drifting from its own past."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ganlab.tricks.base import Player, Trick


class HistoricalAveraging(Trick):
    """Adds ``weight * ||theta - (1/t) sum_{i=1}^t theta[i]||^2`` to each listed player's loss.

    ``theta[1]`` is the parameter state before the first update and ``theta[i]`` the state after update i - 1,
    so the penalty is exactly zero at the first step. The running mean is updated in place after each optimizer
    step (O(parameters), no host sync) and saved in checkpoints.
    """

    def __init__(self, weight: float = 1e-3, players: Sequence[str] = ("G", "D")) -> None:
        if weight < 0:
            raise ValueError(f"tricks.historical_averaging.weight must be >= 0 (got {weight})")
        bad = set(players) - {"G", "D"}
        if bad:
            raise ValueError(f"tricks.historical_averaging.players must be G and/or D (got {sorted(bad)})")
        self.weight, self.players = float(weight), tuple(players)
        self.mean: dict[str, list[Tensor]] = {}
        self.count: dict[str, int] = {}

    def _ensure(self, player: str, net: nn.Module) -> list[Tensor]:
        params = [p for p in net.parameters()]
        if player not in self.mean:
            self.mean[player] = [p.detach().clone() for p in params]
            self.count[player] = 1
        elif self.mean[player][0].device != params[0].device:  # restored on CPU, training on an accelerator
            self.mean[player] = [m.to(p.device) for m, p in zip(self.mean[player], params, strict=True)]
        return self.mean[player]

    def penalty(self, player: Player, net: nn.Module) -> Tensor | None:
        if player not in self.players or self.weight == 0:
            return None
        mean = self._ensure(player, net)
        sq = [(p - m).pow(2).sum() for p, m in zip(net.parameters(), mean, strict=True)]
        return self.weight * torch.stack(sq).sum()

    @torch.no_grad()
    def after_update(self, player: Player, net: nn.Module) -> None:
        if player not in self.players:
            return
        mean = self._ensure(player, net)
        self.count[player] += 1
        # running mean: m_t = m_{t-1} + (theta_t - m_{t-1}) / t
        for m, p in zip(mean, net.parameters(), strict=True):
            m.add_(p.detach() - m, alpha=1.0 / self.count[player])

    def state_dict(self) -> dict[str, Any]:
        return {"mean": {k: [m.cpu() for m in v] for k, v in self.mean.items()}, "count": dict(self.count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean = {k: list(v) for k, v in state["mean"].items()}
        self.count = dict(state["count"])
