"""What every network shares: a normalisation chosen by argument, and discriminators whose hidden blocks are
exposed as features, with layers a trick inserts after any of them and a head that gives one logit per example
(or ``n_outputs`` logits: the class logits of the semi-supervised discriminator).

The networks know no trick: a trick hands them a normalisation factory (``norm``) or layers to insert
(``inserts``, see :class:`ganlab.tricks.base.LayerInsert`) through generic constructor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ganlab.tricks.base import LayerInsert

NormFactory = Callable[[int, int], nn.Module]  # (features, dims) -> layer; dims 1 for vectors, 2 for maps


def batch_norm(features: int, dims: int) -> nn.Module:
    """Batch normalisation of ``features`` channels of vectors (``dims=1``) or feature maps (``dims=2``)."""
    return nn.BatchNorm2d(features) if dims == 2 else nn.BatchNorm1d(features)


def resolve_norm(norm: str | NormFactory | None) -> NormFactory | None:
    """A network's ``norm`` argument as a factory: ``"batch"``, ``"none"``/None, or a trick's factory."""
    if norm is None or norm == "none":
        return None
    if norm == "batch":
        return batch_norm
    if callable(norm):
        return norm
    raise ValueError(f"unknown normalisation {norm!r} (batch | none, or a trick's factory)")


def norm_or_identity(make: NormFactory | None, features: int, dims: int) -> nn.Module:
    return make(features, dims) if make is not None else nn.Identity()


def normalise_layers(layers: Sequence[int], n_blocks: int, what: str) -> list[int]:
    """Map python-style indices (``-1`` = last hidden layer) to ``0..n_blocks-1``, sorted; fail on out-of-range
    ones and on a layer named twice (``[-1, 2]`` with 3 blocks): a layer counted twice would weigh double."""
    out: list[int] = []
    for i in layers:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise ValueError(f"{what}: layer {i} does not exist (D has {n_blocks} hidden layers: 0..{n_blocks - 1})")
        if j in out:
            raise ValueError(f"{what}: {list(layers)} names layer {j} twice (D has {n_blocks} hidden layers)")
        out.append(j)
    return sorted(out)


WIDEN = 100  # _own_seed's k for the widening of a block's (or the head's) input


def _own_seed(place: int, k: int) -> int:
    """The seed of what a trick adds at ``place`` (a block index; ``n_blocks``: the head), ``k``-th there: a
    function of the run's seed (``torch.initial_seed()``) and the place, drawn from no stream the networks share.
    """
    return (torch.initial_seed() * 1_000_003 + 1_009 * (place + 1) + k) % 2**63


def _widen_input(module: nn.Module, extra: int, seed: int) -> None:
    """Give the first linear or conv layer of ``module`` ``extra`` more inputs, after its own. Its weights for
    its own inputs stay the ones every arm draws; the new ones are drawn from generator ``seed`` at the scale of
    PyTorch's default for the layer as built (uniform, bound 1/sqrt(its fan-in))."""
    layer = next(m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    w = layer.weight.detach()  # [out, in] or [out, in, k, k]
    bound = 1.0 / math.sqrt(w[0].numel())
    new = torch.empty(w.shape[0], extra, *w.shape[2:], dtype=w.dtype)
    new.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
    layer.weight = nn.Parameter(torch.cat([w, new], dim=1))
    if isinstance(layer, nn.Linear):
        layer.in_features += extra
    else:
        layer.in_channels += extra


@contextmanager
def batch_parts(module: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Within this block, layers of ``module`` that look across the batch (those with a ``parts`` attribute:
    minibatch discrimination) treat the batch as consecutive parts of ``sizes`` examples, each its own batch:
    a pass over ``[real; fake]`` then gives every example the similarity features of its own half, as two
    passes would (Salimans et al. 2016 §3.2 compute them per batch, real and generated apart)."""
    layers = [m for m in module.modules() if hasattr(m, "parts")]
    for m in layers:
        m.parts = tuple(int(n) for n in sizes)
    try:
        yield
    finally:
        for m in layers:
            m.parts = None


class Discriminator(nn.Module):
    """``forward(x) -> (logits [n], features)`` where ``features[i]`` is the output of hidden block ``i``.

    With ``n_outputs = K > 1`` (whose head then has K outputs) the logits are ``[n, K]``: the class logits of the
    semi-supervised GAN (Salimans et al. 2016 §5). The default K = 1 gives ``[n]``.

    Subclasses build the blocks through :meth:`_build`, which places the inserted layers after the blocks they
    name and widens the next block's input by each layer's ``extra_features``. A layer whose ``flat_output`` is
    true (minibatch discrimination) returns flat features ``[n, in_features + extra]`` whatever its input: on a
    conv D it can only follow the last hidden block, where the head flattens anyway.

    The same seed gives the same base network with or without inserted layers: every block and the head are
    built at their base width on the networks' stream, which therefore moves as in every other arm, and then
    widened for the inserted features (:func:`_widen_input`); the inserted layers' parameters and the widened
    inputs' weights come from generators of their own (:func:`_own_seed`). Arms differ only in what they add.
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
        inserts: Sequence[LayerInsert],
        *,
        maps: bool = False,
    ) -> None:
        """``make_block(i, in_width) -> (block, out_width)``; ``flat_size(i, width)`` is the number of features
        of block ``i``'s output per example (what an inserted layer sees); ``make_head(features)`` takes the
        number of features per example it receives, flat. ``maps``: the blocks output feature maps (a conv D),
        whose width counts channels."""
        at = [normalise_layers(ins.layers, n_blocks, "inserted layer") for ins in inserts]
        self.blocks = nn.ModuleList()
        self.inserted = nn.ModuleDict()  # str(block index) -> the layers after that block, in trick order
        width = in_width
        flat = not maps
        features = 0
        added = 0  # features the inserted layers appended since the last block: its base width is without them
        for i in range(n_blocks):
            block, width = make_block(i, width - added)
            if added:
                _widen_input(block, added, _own_seed(i, WIDEN))
            self.blocks.append(block)
            features = base_features = flat_size(i, width)
            added = 0
            layers = []
            for ins, where in zip(inserts, at, strict=True):
                if i not in where:
                    continue
                with torch.random.fork_rng(devices=[]):  # the networks' own stream does not move
                    torch.manual_seed(_own_seed(i, len(layers)))
                    layer = ins.make(width if maps and not flat else features)  # a map's channels, or flat width
                extra = int(layer.extra_features)
                if getattr(layer, "flat_output", False) and not flat:
                    if i != n_blocks - 1:
                        raise ValueError(
                            f"{type(layer).__name__} outputs flat features: on a conv D it can only follow the "
                            f"last hidden block ({n_blocks - 1}, or -1), not block {i}"
                        )
                    flat = True  # from here on the features are one flat vector per example
                width += extra  # the next inserted layer (or block) sees the widened output
                added += extra
                features = features + extra if flat else flat_size(i, width)
                layers.append(layer)
            if layers:
                self.inserted[str(i)] = nn.Sequential(*layers)
        self.head = make_head(base_features)
        if features != base_features:
            _widen_input(self.head, features - base_features, _own_seed(n_blocks, WIDEN))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feats = []
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            feats.append(h)
            key = str(i)
            if key in self.inserted:
                h = self.inserted[key](h)
        out = self.head(h)
        return (out.squeeze(1) if self.n_outputs == 1 else out), feats
