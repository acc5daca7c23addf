"""Evaluation: FID/IS/KID/precision/recall through torch-fidelity (Inception-v3 or the shipped digits CNN),
PacGAN's mode-coverage metrics for 2-D mixtures and stacked digits, the per-data-set evaluator and the
``Evaluation`` callback (``conf/metrics/default.yaml``)."""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports (PEP 562): ``python -m ganlab.metrics.classifier`` must not find its own module pre-imported,
# and importing the package should not pay for torch-fidelity until a metric is used.
_EXPORTS = {
    "DigitsClassifier": "classifier",
    "load_digits_classifier": "classifier",
    "Evaluator": "evaluator",
    "build_evaluator": "evaluator",
    "Evaluation": "callback",
    "DIGITS_EXTRACTOR": "protocol",
    "INCEPTION_EXTRACTOR": "protocol",
    "ModeMetric": "protocol",
    "protocol_name": "protocol",
    "REFERENCE_PASSES": "fidelity",
    "DigitsFeatureExtractor": "fidelity",
    "compute_fidelity": "fidelity",
    "MixtureModes": "modes",
    "mode_coverage": "modes",
    "StackedModes": "stacked",
    "channel_classifier_from_labels": "stacked",
    "classify_channels": "stacked",
    "stacked_mode_stats": "stacked",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ganlab.metrics.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ganlab.metrics' has no attribute {name!r}")
