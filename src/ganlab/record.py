"""The run record: ``summary.json``'s lifecycle, the code's identity (git) and where a resumed run starts from.

``summary.json`` is written with ``status: running`` first and ``completed`` or ``failed`` last, so a sweep can
tell a crashed job from a finished one without W&B; every write is atomic (a temporary file renamed over the old
one), so a kill never leaves half a summary.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ganlab.errors import UserError

SRC_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The project's commit (with ``-dirty`` when the tree has uncommitted changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(SRC_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(SRC_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``resume`` may be a run folder, a checkpoint file, or ``auto`` (this run folder's last.ckpt if any:
    what a requeued cluster job wants)."""
    if resume in (None, ""):
        return None
    if resume == "auto":
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        return ckpt if ckpt.is_file() else None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"resume: no checkpoint at {path}")
    return path


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as JSON atomically (a kill leaves either the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON record, or ``{}`` when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}


class RunRecord:
    """``summary.json`` of one run folder: opened as ``running``, updated as the run learns its identity, closed
    as ``completed`` or ``failed``."""

    def __init__(self, folder: Path, **fields: Any) -> None:
        self.path = Path(folder) / "summary.json"
        self.previous = read_json(self.path)  # what an earlier run in this folder recorded (its W&B id...)
        self.data: dict[str, Any] = {"status": "running", "git_commit": git_commit(), **fields}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def update(self, **fields: Any) -> None:
        self.data.update(fields)

    def save(self) -> None:
        write_json(self.path, self.data)

    def adopt_previous(self, ckpt: Path) -> None:
        """A run resumed from another folder's checkpoint continues that run's record (its W&B run)."""
        src = ckpt.parent.parent / "summary.json"
        if src.is_file() and src != self.path:
            self.previous = read_json(src)
