"""The alternating schedule as data (Goodfellow et al. 2014, Algorithm 1; the phases of stylegan2-ada's loop).

One *generator step* runs the phases in order; a phase updates one player ``repeats`` times. Every update owns a
*slot*: the index of its real batch and its noise batch among those drawn for the step. So the number of
optimizer steps per generator step, the batch allocation and the Lightning budget are all read from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ganlab.tricks.base import PLAYERS, Player


@dataclass(frozen=True)
class Phase:
    """Update ``player`` ``repeats`` times in a row."""

    player: Player
    repeats: int

    def __post_init__(self) -> None:
        if self.player not in PLAYERS:
            raise ValueError(f"a phase updates D or G (got {self.player!r})")
        if self.repeats < 1:
            raise ValueError(f"a phase repeats at least once (got {self.repeats})")


@dataclass(frozen=True)
class Update:
    """One optimizer step of a generator step: its player and its slot (real batch and noise index)."""

    player: Player
    slot: int


@dataclass(frozen=True)
class Schedule:
    """The phases of one generator step, unrolled into :class:`Update` entries with consecutive slots."""

    phases: tuple[Phase, ...]
    updates: tuple[Update, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not any(p.player == "G" for p in self.phases):
            raise ValueError("a schedule needs a G phase: the budget counts generator steps")
        unrolled = [p.player for p in self.phases for _ in range(p.repeats)]
        object.__setattr__(self, "updates", tuple(Update(player, i) for i, player in enumerate(unrolled)))

    @classmethod
    def alternating(cls, d_steps: int) -> Schedule:
        """k D updates, each on a fresh real batch and fresh noise, then one G update (Algorithm 1)."""
        return cls((Phase("D", int(d_steps)), Phase("G", 1)))

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per generator step: what Lightning's ``global_step`` advances by (k + 1)."""
        return len(self.updates)

    def count(self, player: Player) -> int:
        """Updates of ``player`` per generator step."""
        return sum(1 for u in self.updates if u.player == player)
