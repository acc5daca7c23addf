"""Batch normalisation in D (the seed's "batch norm in D"; DCGAN's discriminator)."""

from __future__ import annotations

from typing import Any

from ganlab.tricks.base import Player, Trick


class BatchNormD(Trick):
    """``tricks=[batch_norm_d]``: batch norm on every hidden block of D but the first (DCGAN's convention)."""

    def network_args(self, player: Player) -> dict[str, Any]:
        return {"norm": "batch"} if player == "D" else {}
