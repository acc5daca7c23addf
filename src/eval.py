"""Evaluate a saved model: ``python src/eval.py <run folder or .ckpt> [metrics.n_samples=50000 ...]``.

Writes ``evals/<protocol>.json`` into the run folder (never over the training's results) and logs to the run's W&B
run; the logic lives in ``ganlab.evaluate``. Bad input exits 2 with a one-line reason.
"""

from __future__ import annotations

import sys

from ganlab.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
