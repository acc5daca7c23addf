"""The trick interface: what a stabilising trick may change, with no knowledge of the training loop.

A trick is a ``_target_`` object of the ``tricks`` config group. It acts through any of these hooks, each optional:

- structure, before training: :meth:`Trick.network_args` (keyword arguments for a player's network: a
  normalisation factory, layers to insert) and :meth:`Trick.wrap_generator` (wrap G, e.g. with a reference pass);
- the objective: :attr:`Trick.real_target` (the D loss's target for real examples);
- every update: :meth:`Trick.penalty` (a term added to that player's loss) and :meth:`Trick.after_update`;
- checkpoints: :meth:`Trick.state_dict` / :meth:`Trick.load_state_dict`.

This module imports nothing from the training loop, so the networks can import it without importing Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

Player = Literal["D", "G"]
PLAYERS: tuple[Player, ...] = ("D", "G")


@dataclass(frozen=True)
class LayerInsert:
    """Layers a trick inserts into D after the hidden blocks ``layers`` (python-style indices, ``-1`` = the last).

    ``make(in_features)`` builds one layer for a block whose output has ``in_features`` features per example:
    its width when flat, its channels when a feature map. The layer maps ``[n, w]`` (or ``[n, c, h, w]``) to
    ``[n, w + extra]`` (or ``[n, c + extra, h, w]``; a ``flat_output`` layer to ``[n, c*h*w + extra]``) and
    states ``extra`` as its ``extra_features`` attribute, so the network widens the next block.
    """

    layers: Sequence[int]
    make: Callable[[int], nn.Module]


class Trick:
    """Base of the pluggable training tricks; every hook is optional (see the module docstring)."""

    real_target: float | None = None

    def network_args(self, player: Player) -> dict[str, Any]:
        """Keyword arguments for ``player``'s network constructor: ``norm`` (a normalisation factory
        ``(features, dims) -> nn.Module``) or ``inserts`` (a list of :class:`LayerInsert`)."""
        return {}

    def wrap_generator(self, generator: nn.Module, prior: Any) -> nn.Module:
        """Return G, possibly wrapped (``prior.sample(shape)`` draws noise from the configured prior)."""
        return generator

    def setup(self, module: Any) -> None:
        """Called once the training module holds its networks (e.g. to snapshot parameters)."""

    def penalty(self, player: Player, net: nn.Module) -> Tensor | None:
        """A term added to ``player``'s loss at every update (None: nothing)."""
        return None

    def after_update(self, player: Player, net: nn.Module) -> None:
        """Called after every optimizer step of ``player``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""


def network_args(tricks: Iterable[Trick], player: Player) -> dict[str, Any]:
    """Merge the tricks' network arguments for ``player``: ``inserts`` lists concatenate; any other key may be
    set by one trick only (two tricks replacing D's normalisation is a configuration error, said in one line)."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for trick in tricks:
        for key, value in trick.network_args(player).items():
            if key == "inserts":
                merged.setdefault("inserts", []).extend(value)
            elif key in merged:
                raise ValueError(
                    f"tricks {owner[key]} and {type(trick).__name__} both set {player}'s {key}: keep one of them"
                )
            else:
                merged[key], owner[key] = value, type(trick).__name__
    return merged
