"""Sample a saved model: ``python src/generate.py <run folder or .ckpt> n=1000 [out=<folder>] [seed=0]``.

Writes one PNG per sample (images) or ``samples.npz`` (points), a grid and a latent interpolation strip into
``<run>/generated/...``; the logic lives in ``ganlab.generate``. Bad input exits 2 with a one-line reason.
"""

from __future__ import annotations

import sys

from ganlab.generate import main

if __name__ == "__main__":
    sys.exit(main())
