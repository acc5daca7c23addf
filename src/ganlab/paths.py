"""Where the configs live: the checkout's ``conf/`` when running from a checkout, else the copy shipped inside the
installed package (``ganlab/conf``, copied there at build time by ``setup.py``).

The top-level ``conf/`` is the one source of truth; the packaged copy exists only in built wheels, so a checkout
(and an editable install, which imports from ``src/``) always reads the configs a developer edits.
"""

from __future__ import annotations

from pathlib import Path

from ganlab.errors import UserError

_PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The Hydra config folder (the one holding ``config.yaml``): the checkout's, else the packaged copy."""
    for candidate in (_PACKAGE.parents[1] / "conf", _PACKAGE / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise UserError(f"no Hydra configs: neither {_PACKAGE.parents[1] / 'conf'} nor {_PACKAGE / 'conf'} exists")
