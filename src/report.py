"""Compare the arms of a sweep: ``python src/report.py outputs/multirun/<date>/<time>``.

Writes ``report.md``, ``report.json`` and ``plots/`` into that folder and prints the tables; the logic lives in
``ganlab.report``. A missing folder or one without runs exits 2 with a one-line reason.
"""

from __future__ import annotations

import sys

from ganlab.report import main

if __name__ == "__main__":
    sys.exit(main())
