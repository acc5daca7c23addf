"""In-memory data sets sampled by index.

Every data set here fits in memory, so it lives as one tensor (moved to the accelerator with the module) and
batches are gathered by index: no DataLoader workers, and batch ``s`` of a run is a pure function of
``(seed, s)``, which is what makes a resumed run continue bit-identically.

Images are stored as ``uint8 [N, C, H, W]`` (what torch-fidelity wants) and mapped to ``[-1, 1]`` on the fly;
2-D/1-D points are stored as ``float32 [N, D]``.

Each data set also says how it is judged, in its ``evaluation`` class attribute (an :class:`EvalSpec`): the
evaluator, the sample previews and the run record read that, never the data set's name.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from ganlab.metrics.protocol import ModeMetric

Preview = Literal["grid", "scatter", "density"]
PREVIEWS: tuple[str, ...] = ("grid", "scatter", "density")


@dataclass(frozen=True)
class EvalSpec:
    """How a data set is evaluated and previewed; the one place that decision lives.

    - ``samples``: generated samples per evaluation in the data set's protocol (``metrics.n_samples`` overrides
      it); every metric name carries the count actually used (``fid2k``, ``modes2500``, ``stacked_modes26k``).
    - ``interim_samples``: generated samples of the evaluations before a run's last one, for protocols too costly
      to repeat (stacked digits: 2,000 of 26,000); None: ``samples``. Names carry the count, so the run's final
      numbers keep the protocol's names (``stacked_modes26k``) and the interim ones have their own
      (``stacked_modes2k``). ``metrics.n_samples`` sets both.
    - ``features``: torch-fidelity feature extractor for FID/IS/KID/precision/recall:
      ``ganlab.metrics.protocol.DIGITS_EXTRACTOR`` (the shipped digits CNN), ``INCEPTION_EXTRACTOR``
      (Inception-v3, ``metrics.inception_weights``), or None (no fidelity metrics).
    - ``modes``: a mode-coverage metric (``MixtureModes()``, ``StackedModes(...)``) or None.
    - ``preview``: what the fixed-noise sample previews are: ``"grid"`` (an image grid), ``"scatter"`` (2-D
      points over the real data) or ``"density"`` (1-D: p_data, p_g and D(x), Goodfellow et al. Figure 1).
    """

    samples: int = 2000
    features: str | None = None
    modes: ModeMetric | None = None
    preview: Preview = "grid"
    interim_samples: int | None = None  # last, so positional uses of the other fields stay valid

    def __post_init__(self) -> None:
        if self.preview not in PREVIEWS:
            raise ValueError(f"EvalSpec.preview must be one of {', '.join(PREVIEWS)} (got {self.preview!r})")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"EvalSpec.samples must be a positive integer (got {self.samples!r})")
        if self.interim_samples is not None and (not isinstance(self.interim_samples, int) or self.interim_samples < 1):
            raise ValueError(f"EvalSpec.interim_samples must be a positive integer (got {self.interim_samples!r})")


def describe(data: InMemoryData) -> dict[str, Any]:
    """The data set's identity and evaluation declaration as JSON-ready values (``summary.json``'s ``data``).

    ``{"name", "preview", "features", "modes", "eval_samples"}``; ``modes`` is the metric's repr (e.g.
    ``"StackedModes(from_labels=True)"``) or None. The report reads ``preview`` from here.
    """
    spec = data.evaluation
    return {
        "name": data.name,
        "preview": spec.preview,
        "features": spec.features,
        "modes": None if spec.modes is None else repr(spec.modes),
        "eval_samples": spec.samples,
    }


class Ticks:
    """An endless stream of integers: one item per generator step. The module samples its own real batches.

    A plain iterable, not a ``DataLoader``: Lightning takes any iterable, and a ``DataLoader`` would only add its
    own per-item machinery (~55 us a step, ~0.5 % of a ring8 step) to hand over an integer nobody reads."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class InMemoryData(pl.LightningDataModule):
    """Base class: subclasses implement :meth:`load` and set ``kind`` and ``evaluation``.

    After :meth:`setup`: ``train_x``, ``train_y`` (or None), ``test_x``, ``test_y`` (or None).
    """

    name: str = "base"
    kind: str = "image"  # storage: "image" (uint8 NCHW) or "points" (float32 [N, D])
    num_classes: int | None = None
    n_preview: int = 64  # fixed-noise samples in each sample grid
    batch_size: int = 64  # m when the config leaves batch_size null
    d_steps: int = 1  # k when the config leaves d_steps null
    evaluation: EvalSpec = EvalSpec()  # no metrics, image-grid previews: each data set declares its own

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

    def train_dataloader(self) -> Ticks:
        return Ticks()

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
