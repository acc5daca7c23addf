"""In-memory data sets sampled by index.

Every data set here fits in memory, so it lives as one tensor (moved to the accelerator with the module) and
batches are gathered by index: no DataLoader workers, and batch ``s`` of a run is a pure function of
``(seed, s)``, which is what makes a resumed run continue bit-identically.

Images are stored as ``uint8 [N, C, H, W]`` (what torch-fidelity wants) and mapped to ``[-1, 1]`` on the fly;
2-D/1-D points are stored as ``float32 [N, D]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset


class _Ticks(IterableDataset):
    """An endless stream of integers: one item per generator step. The module samples its own real batches."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class InMemoryData(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`load` and set ``kind``.

    After :meth:`setup`: ``train_x``, ``train_y`` (or None), ``test_x``, ``test_y`` (or None).
    """

    name: str = "base"
    kind: str = "image"  # "image" (uint8 NCHW) or "points" (float32 [N, D])
    num_classes: int | None = None
    n_preview: int = 64  # fixed-noise samples in each sample grid
    batch_size: int = 64  # m when the config leaves batch_size null
    eval_samples: int = 2000  # generated samples per evaluation unless metrics.n_samples says otherwise

    def __init__(self) -> None:
        super().__init__()
        self.train_x: Tensor | None = None
        self.train_y: Tensor | None = None
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None

    # -- subclasses -------------------------------------------------------------------------------------------
    def load(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Return ``(train_x, train_y, test_x, test_y)``; labels may be None."""
        raise NotImplementedError

    # -- LightningDataModule ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_x is None:
            self.train_x, self.train_y, self.test_x, self.test_y = self.load()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(), batch_size=None)

    # -- conversions ------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(2,)`` or ``(1, 8, 8)``."""
        self.setup()
        return tuple(self.train_x.shape[1:])

    def to_model(self, x: Tensor) -> Tensor:
        """Stored form -> model space: uint8 images to float in [-1, 1]; points unchanged."""
        if self.kind == "image":
            return x.float().div_(127.5).sub_(1.0)
        return x

    def to_uint8(self, x: Tensor) -> Tensor:
        """Model space [-1, 1] -> uint8 images (the inverse of :meth:`to_model`, rounded)."""
        return ((x.clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)
