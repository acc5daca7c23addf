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


# what a record says about how its run (or its latest attempt) went: kept per attempt when a run is continued
OUTCOME_KEYS = (
    "status",
    "error",
    "resume",
    "final",
    "g_steps",
    "d_updates",
    "global_step",
    "train_time_s",
    "wall_time_s",
    "eval_time_s",
    "overrides",
)
TIME_KEYS = ("train_time_s", "wall_time_s", "eval_time_s")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a kill leaves either the old file or the new one; a failed write, e.g.
    a full disk, leaves the old file and no temporary one)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def keep_config(run_dir: Path, attempt: int) -> str | None:
    """Keep the run folder's ``config.yaml`` (about to be replaced by the next attempt's) as
    ``config.attempt<attempt>.yaml``, atomically; an existing copy stays as it is. ``attempt`` is the number of
    the ``attempts`` entry that replaces it, so entries that trained nothing (a record completed from its
    checkpoint) leave gaps in the numbers; that entry's ``before.config`` names the file. Returns the copy's name,
    or None when there is no config.yaml."""
    current = run_dir / "config.yaml"
    if not current.is_file():
        return None
    target = run_dir / f"config.attempt{attempt}.yaml"
    if not target.exists():
        write_text(target, current.read_text())
    return target.name


def read_json(path: Path) -> dict[str, Any]:
    """A JSON record, or ``{}`` when there is none; a damaged one (cut short, not an object) is a one-line
    :class:`UserError` naming the file (nothing is written over it)."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}): the file is damaged; it is left as it is") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a JSON record (a {type(obj).__name__}, not an object)")
    return obj


class RunRecord:
    """``summary.json`` of one run folder: opened as ``running``, updated as the run learns its identity, closed
    as ``completed``, ``interrupted``, ``diverged`` or ``failed``.

    A run resumed in its own folder keeps what its record already said (its W&B id, the data declaration...) and
    appends the attempt to ``attempts``, whose ``before`` keeps what the record said of the earlier attempt (its
    status, final values, steps, times and overrides: an extended completed run keeps its completed record there);
    a run resumed from another folder's checkpoint is a new run with its own W&B id (``parent_wandb_id`` names the
    source's).
    """

    def __init__(self, folder: Path, **fields: Any) -> None:
        self.path = Path(folder) / "summary.json"
        self.previous = read_json(self.path)  # what an earlier run in this folder recorded (its W&B id...)
        self.data: dict[str, Any] = {"status": "running", "git_commit": git_commit(), **fields}
        self.continued = False  # a resumed run: its attempt is the last entry of ``attempts``
        self.earlier_times: dict[str, float] = {}  # resumed in its own folder: the totals of the earlier attempts

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def update(self, **fields: Any) -> None:
        self.data.update(fields)

    def save(self) -> None:
        write_json(self.path, self.data)

    def try_save(self) -> bool:
        """Save; on an OS error (full disk, folder gone) return False instead of raising (the caller is already
        reporting an error, or reports this one)."""
        try:
            self.save()
        except OSError:
            return False
        return True

    def resume_from(self, ckpt: Path, step: int) -> None:
        """Record that this run continues from ``ckpt`` (at generator step ``step``)."""
        source = ckpt.parent.parent / "summary.json"
        entry: dict[str, Any] = {
            "resumed_from": str(ckpt),
            "from_step": step,
            "git_commit": self.data.get("git_commit"),
            "overrides": self.data.get("overrides"),
        }
        if source.resolve() == self.path.resolve():
            # the folder's totals so far: this attempt's own times are added to them (add_times)
            self.earlier_times = {k: float(self.previous.get(k) or 0.0) for k in TIME_KEYS}
            kept = {k: v for k, v in self.previous.items() if k not in ("status", "error", "final", "resume")}
            self.data = {**kept, **self.data}
            # what the record said before this attempt (a completed run's status and final among it) stays here
            entry["before"] = {k: self.previous[k] for k in OUTCOME_KEYS if k in self.previous}
        else:  # a branch into a new folder: its own W&B run, the source's named as its parent
            parent = read_json(source).get("wandb_id")
            if parent:
                entry["parent_wandb_id"] = parent
                self.data["parent_wandb_id"] = parent
        attempts = list(self.data.get("attempts") or [])
        attempts.append(entry)
        self.data.update(resumed_from=str(ckpt), attempts=attempts)
        self.continued = True

    def restart(self) -> int:
        """Record that this run starts again from step 0 in a folder whose earlier attempt stopped before its first
        checkpoint (``resume=auto``): what that attempt's record said is kept in a new entry of ``attempts``
        (``restarted``; ``before``, with its W&B id: the restart is a new W&B run). Returns the earlier attempt's
        number (its files are kept as ``metrics.attempt<N>.csv`` and ``config.attempt<N>.yaml``)."""
        earlier = list(self.previous.get("attempts") or [])
        before = {k: self.previous[k] for k in (*OUTCOME_KEYS, "wandb_id") if k in self.previous}
        entry = {"restarted": True, "from_step": 0, "git_commit": self.data.get("git_commit"), "before": before}
        entry["overrides"] = self.data.get("overrides")
        self.earlier_times = {k: float(self.previous.get(k) or 0.0) for k in TIME_KEYS}
        self.data.update(attempts=[*earlier, entry])
        self.continued = True
        return len(earlier) + 1

    def add_times(self, **own: float) -> None:
        """Record this attempt's own times (``train_time_s``, ``wall_time_s``, ``eval_time_s``): in its entry of
        ``attempts`` and, added to the earlier attempts' totals in this folder, at the top level (the run's
        totals: the first run's own times, in ``attempts[0]["before"]``, plus every attempt's)."""
        self.note_attempt(**own)
        self.data.update({k: round(self.earlier_times.get(k, 0.0) + v, 2) for k, v in own.items()})

    def note_attempt(self, **fields: Any) -> None:
        """Add ``fields`` to this attempt's entry in ``attempts`` (nothing for a run that is not a continuation)."""
        if self.continued:
            self.data["attempts"][-1].update(fields)
