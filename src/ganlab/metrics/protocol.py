"""What a data set's evaluation is made of, in the words data sets use to declare it (no heavy imports here).

- :func:`protocol_name`: the one spelling of every metric name's protocol suffix (``fid2k``, ``modes2500``,
  ``stacked_modes26k``), so two numbers computed on different sample counts never share a name.
- :data:`DIGITS_EXTRACTOR`, :data:`INCEPTION_EXTRACTOR`: the torch-fidelity feature extractors a data set may
  name for FID/IS/KID/precision/recall.
- :class:`ModeMetric`: what a mode-coverage metric provides (:class:`~ganlab.metrics.modes.MixtureModes`,
  :class:`~ganlab.metrics.stacked.StackedModes`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

DIGITS_EXTRACTOR = "digits-cnn"  # the shipped 8x8 digits CNN (ganlab.metrics.classifier), offline and CPU-fast
INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's port of the TF Inception-v3 of published numbers


def protocol_name(metric: str, n: int) -> str:
    """``metric`` with its sample count: whole thousands as ``k``, anything else as the exact integer.

    ``protocol_name("fid", 2000) == "fid2k"``, ``("modes", 2500) -> "modes2500"``, ``("stacked_kl", 26000) ->
    "stacked_kl26k"``, ``("is", 500) -> "is500"``.
    """
    return f"{metric}{n // 1000}k" if n > 0 and n % 1000 == 0 else f"{metric}{n}"


class ModeMetric(Protocol):
    """A mode-coverage metric a data set declares (``EvalSpec.modes``).

    :meth:`prepare` is called once per run with the (set-up) data module; it returns the function the evaluator
    calls on every evaluation's generated samples (in the data set's stored form), whose keys are already
    protocol names (:func:`protocol_name`).
    """

    def prepare(
        self, data: Any, *, cache_dir: str | os.PathLike[str] | None = None
    ) -> Callable[[Tensor], dict[str, float]]: ...
