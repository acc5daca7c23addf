"""What every discriminator shares: hidden blocks whose outputs are exposed as features, optional
minibatch-discrimination layers after any of them, and a head that gives one logit per example (or ``n_outputs``
logits: the class logits of the semi-supervised discriminator)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ganlab.tricks.minibatch_discrimination import MinibatchDiscrimination


def normalise_layers(layers: Sequence[int], n_blocks: int, what: str) -> list[int]:
    """Map python-style indices (``-1`` = last hidden layer) to ``0..n_blocks-1``; fail on out-of-range ones."""
    out = []
    for i in layers:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise ValueError(f"{what}: layer {i} does not exist (D has {n_blocks} hidden layers: 0..{n_blocks - 1})")
        out.append(j)
    return sorted(set(out))


class Discriminator(nn.Module):
    """``forward(x) -> (logits [n], features)`` where ``features[i]`` is the output of hidden block ``i``.

    With ``n_outputs = K > 1`` (set by subclasses, whose head then has K outputs) the logits are ``[n, K]``: the
    class logits of the semi-supervised GAN (Salimans et al. 2016 §5). The default K = 1 gives ``[n]``.

    Subclasses build the blocks through :meth:`_build`, which inserts a minibatch-discrimination layer after the
    blocks named in ``minibatch["layers"]`` and widens the next block's input accordingly.
    """

    n_outputs: int = 1

    def set_outputs(self, n_outputs: int) -> None:
        """Validate and set K, the number of logits the head gives."""
        if n_outputs < 1:
            raise ValueError(f"model.discriminator.n_outputs must be >= 1 (got {n_outputs})")
        self.n_outputs = int(n_outputs)

    def _build(
        self,
        n_blocks: int,
        make_block: Callable[[int, int], tuple[nn.Module, int]],
        make_head: Callable[[int], nn.Module],
        in_width: int,
        flat_size: Callable[[int, int], int],
        minibatch: Mapping[str, Any] | None,
    ) -> None:
        """``make_block(i, in_width) -> (block, out_width)``; ``flat_size(i, width)`` is the number of features
        of block ``i``'s output per example (what the MBD layer's ``T`` multiplies)."""
        mbd_layers = []
        if minibatch is not None:
            mbd_layers = normalise_layers(minibatch.get("layers", [-1]), n_blocks, "minibatch_discrimination")
        self.blocks = nn.ModuleList()
        self.mbd = nn.ModuleDict()
        width = in_width
        for i in range(n_blocks):
            block, width = make_block(i, width)
            self.blocks.append(block)
            if i in mbd_layers:
                layer = MinibatchDiscrimination(
                    flat_size(i, width),
                    int(minibatch.get("n_kernels", 100)),
                    int(minibatch.get("kernel_dim", 5)),
                )
                self.mbd[str(i)] = layer
                width += layer.n_kernels
        self.head = make_head(width)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feats = []
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            feats.append(h)
            key = str(i)
            if key in self.mbd:
                h = self.mbd[key](h)
        out = self.head(h)
        return (out.squeeze(1) if self.n_outputs == 1 else out), feats
