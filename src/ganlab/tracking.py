"""Loggers: a durable CSV file in the run folder, and Weights & Biases that never blocks on a login prompt or an
unreachable server.

Every metric is logged at the *generator step* (the x-axis of every chart, CSV and W&B alike).
"""

from __future__ import annotations

import csv
import io
import math
import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

W_AND_B_TIMEOUT_S = 15  # an unreachable server costs at most this before the run logs offline


class RunCSVLogger(Logger):
    """``metrics.csv`` in the run folder: one row per logged generator step, written and flushed when logged (a
    SIGKILL loses at most the rows since the last log step), never deleted.

    A resumed run keeps the rows up to its checkpoint's step (``keep_until``) and drops later ones, which the
    resumed run logs again; a run resumed into a new folder starts from the source run's rows (``history``). A new
    column (the first evaluation) rewrites the file once, atomically; every other row is appended.
    """

    def __init__(self, run_dir: Path, *, keep_until: int | None = None, history: Path | None = None) -> None:
        super().__init__()
        self.path = Path(run_dir) / "metrics.csv"
        source = history if history is not None and history.is_file() else self.path
        self.columns: list[str] = ["step"]
        rows: list[dict[str, str]] = []
        if keep_until is not None and source.is_file():
            with source.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= keep_until]
        self._rewrite(rows)

    # -- Lightning's Logger interface -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The resolved config is the run folder's ``config.yaml``; nothing to add here."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = {"step": str(step), **{k: _fmt(v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite([*self._read(), row])
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)
            f.flush()

    # -- the file -------------------------------------------------------------------------------------------
    def _read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        tmp = self.path.with_suffix(".csv.tmp")
        try:
            tmp.write_text(buf.getvalue())
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _fmt(value: Any) -> str:
    v = float(value)
    return repr(int(v)) if v.is_integer() and math.isfinite(v) and abs(v) < 2**53 else repr(v)


class StepWandbLogger(WandbLogger):
    """Lightning's W&B logger with the generator step as W&B's own step: a resumed run (online, or offline and
    synced later) continues its steps instead of restarting them at 0, and every chart's x-axis is the G step."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            self.experiment.log(dict(metrics))
        else:
            self.experiment.log({**metrics, "step/g": step}, step=int(step))


_SAID_OFFLINE = False


def has_wandb_credentials() -> bool:
    """An API key in the environment or a ``~/.netrc`` entry for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(requested: str, run_dir: Path) -> str:
    """``auto`` -> ``$WANDB_MODE`` if set, else ``online`` with credentials, else ``offline`` (said once)."""
    global _SAID_OFFLINE
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env == "":
        del os.environ["WANDB_MODE"]  # wandb itself rejects an empty mode
    if env:
        return "offline" if env == "dryrun" else env
    if has_wandb_credentials():
        return "online"
    if not _SAID_OFFLINE:
        print(
            f"W&B: no credentials, logging offline under {run_dir}/wandb "
            "(upload later with `wandb sync <run folder>/wandb/offline-run-*`, or `wandb login` first)",
            file=sys.stderr,
        )
        _SAID_OFFLINE = True
    return "offline"


def make_loggers(
    cfg: Any,
    run_dir: Path,
    run_config: dict,
    *,
    wandb_id: str | None = None,
    keep_until: int | None = None,
    history: Path | None = None,
) -> list[Logger]:
    """The CSV logger (``metrics.csv`` in the run folder) and, unless disabled, the W&B logger.

    ``keep_until``: the generator step a resumed run continues from (its CSV keeps the rows up to it);
    ``history``: the source run's ``metrics.csv`` when resuming into a new folder. An unreachable W&B server never
    stops training for long: online start gives up after ``W_AND_B_TIMEOUT_S`` and the run logs offline.
    """
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(RunCSVLogger(run_dir, keep_until=keep_until, history=history))
    wb = cfg.get("wandb")
    if wb is None:
        return loggers
    mode = resolve_wandb_mode(str(wb.mode), run_dir)
    if mode == "disabled":
        return loggers
    identity = run_config.get("identity", {})
    choices = identity.get("choices", {})
    # the arm, data set and seed as tags, so a dashboard groups a sweep by arm with one click
    auto_tags = [f"{k}:{choices[k]}" for k in ("loss", "data", "model", "task") if k in choices]
    auto_tags.append(f"seed:{run_config.get('seed')}")
    kwargs = dict(
        project=wb.project,
        entity=wb.entity,
        group=wb.group or identity.get("sweep"),
        tags=[*auto_tags, *wb.tags],
        name=wb.name,
        save_dir=str(run_dir),
        config=run_config,
        id=wandb_id,
        resume="allow" if wandb_id else None,
    )
    import wandb

    try:
        settings = wandb.Settings(init_timeout=W_AND_B_TIMEOUT_S) if mode == "online" else None
        logger = StepWandbLogger(mode=mode, settings=settings, **kwargs)
        _ = logger.experiment  # start now, so a failure surfaces here and not mid-training
    except Exception as exc:
        if mode != "online":
            raise
        print(
            f"W&B: online start failed ({exc.__class__.__name__}), logging offline under {run_dir}/wandb "
            "(upload later with `wandb sync`)",
            file=sys.stderr,
        )
        wandb.teardown()
        logger = StepWandbLogger(mode="offline", **kwargs)
        _ = logger.experiment
    loggers.append(logger)
    return loggers


def finish_wandb(loggers: list[Logger], exit_code: int = 0) -> None:
    """Close the W&B run (in a multirun the next job would otherwise log into this one)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=exit_code)
