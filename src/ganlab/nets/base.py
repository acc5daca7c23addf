"""What every network shares: a normalisation chosen by argument, and discriminators whose hidden blocks are
exposed as features, with layers a trick inserts after any of them and a head that gives one logit per example
(or ``n_outputs`` logits: the class logits of the semi-supervised discriminator).

The networks know no trick: a trick hands them a normalisation factory (``norm``) or layers to insert
(``inserts``, see :class:`ganlab.tricks.base.LayerInsert`) through generic constructor arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


class Discriminator(nn.Module):
    """``forward(x) -> (logits [n], features)`` where ``features[i]`` is the output of hidden block ``i``.

    With ``n_outputs = K > 1`` (whose head then has K outputs) the logits are ``[n, K]``: the class logits of the
    semi-supervised GAN (Salimans et al. 2016 §5). The default K = 1 gives ``[n]``.

    Subclasses build the blocks through :meth:`_build`, which places the inserted layers after the blocks they
    name and widens the next block's input by each layer's ``extra_features``. A layer whose ``flat_output`` is
    true (minibatch discrimination) returns flat features ``[n, in_features + extra]`` whatever its input: on a
    conv D it can only follow the last hidden block, where the head flattens anyway.
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
        for i in range(n_blocks):
            block, width = make_block(i, width)
            self.blocks.append(block)
            features = flat_size(i, width)
            layers = []
            for ins, where in zip(inserts, at, strict=True):
                if i not in where:
                    continue
                layer = ins.make(features)
                extra = int(layer.extra_features)
                if getattr(layer, "flat_output", False) and not flat:
                    if i != n_blocks - 1:
                        raise ValueError(
                            f"{type(layer).__name__} outputs flat features: on a conv D it can only follow the "
                            f"last hidden block ({n_blocks - 1}, or -1), not block {i}"
                        )
                    flat = True  # from here on the features are one flat vector per example
                width += extra  # the next inserted layer (or block) sees the widened output
                features = features + extra if flat else flat_size(i, width)
                layers.append(layer)
            if layers:
                self.inserted[str(i)] = nn.Sequential(*layers)
        self.head = make_head(features)

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
