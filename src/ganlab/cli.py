"""What the command line shares: a compose check that turns Hydra's multi-line errors into one line."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def one_line(message: str) -> str:
    """A multi-line library message as one line: its lines joined, a list after a ``...:`` line joined by commas,
    Hydra's search-path dump and OmegaConf's key/type footer dropped."""
    parts: list[str] = []
    listing = False
    for raw in str(message).splitlines():
        line = raw.strip()
        if not line or line.startswith(("full_key:", "object_type=")):
            continue
        if line.startswith("Config search path"):
            break
        if listing and not line.endswith(":"):
            parts[-1] += (", " if not parts[-1].endswith(":") else " ") + line
            continue
        parts.append(line)
        listing = line.endswith(":")
    return "; ".join(parts)


def precheck(args: Sequence[str], conf_dir: Path = CONF_DIR) -> str | None:
    """Compose a single run's overrides as Hydra would; return the one-line reason it fails, or None.

    Only plain ``key=value`` runs are checked here (flags such as ``-m`` or ``--cfg`` go to Hydra as they are):
    a misspelt key or option then costs one line and exit code 2, not Hydra's six.
    """
    if any(a.startswith("-") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in args) or not conf_dir.is_dir():
        return None  # a sweep: Hydra expands it
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            compose(config_name="config", overrides=list(args), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        return one_line(str(exc)) or exc.__class__.__name__
    return None


def exit_on_bad_overrides(args: Sequence[str] | None = None) -> None:
    """``precheck`` the process's arguments; print the reason and exit with code 2 when they do not compose."""
    reason = precheck(sys.argv[1:] if args is None else args)
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        sys.exit(2)
