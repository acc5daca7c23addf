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
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

W_AND_B_TIMEOUT_S = 10  # an unreachable server costs at most this (plus the offline start) before training


def kept_rows(path: Path, keep_until: int) -> tuple[list[str], list[dict[str, str]]]:
    """The columns of ``metrics.csv`` at ``path`` and its rows up to generator step ``keep_until`` (what a resumed
    run keeps); a row whose step is not a number is a one-line :class:`~ganlab.errors.UserError` (the file is left
    as it is)."""
    from ganlab.errors import UserError

    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or ["step"])
            rows = []
            for line, row in enumerate(reader, start=2):
                if not row.get("step"):
                    continue
                try:
                    step = int(float(row["step"]))
                except (TypeError, ValueError, OverflowError):
                    raise UserError(f"{path}: line {line}: step {row['step']!r} is not a number") from None
                if step <= keep_until:
                    rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    return columns, rows


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
            self.columns, rows = kept_rows(source, keep_until)
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
    synced later) continues its steps instead of restarting them at 0, and every chart's x-axis is the G step
    (``step/g`` is logged too, and declared the step metric of every chart)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)  # W&B warns that the setting has no effect

    @property
    def experiment(self) -> Any:
        fresh = self._experiment is None
        run = super().experiment
        if fresh and hasattr(run, "define_metric"):
            run.define_metric("step/g")
            run.define_metric("*", step_metric="step/g")
        return run

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            self.experiment.log(dict(metrics))
        else:
            self.experiment.log({**metrics, "step/g": step}, step=int(step))


def has_wandb_credentials() -> bool:
    """An API key in the environment or a ``~/.netrc`` entry for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(requested: str) -> tuple[str, str]:
    """``auto`` -> ``$WANDB_MODE`` if set, else ``online`` with credentials, else ``offline``; returns the mode
    and why (for the run's one start line)."""
    if requested != "auto":
        return requested, "as configured"
    env = os.environ.get("WANDB_MODE")
    if env == "":
        del os.environ["WANDB_MODE"]  # wandb itself rejects an empty mode
    if env:
        return ("offline" if env == "dryrun" else env), "from WANDB_MODE"
    if has_wandb_credentials():
        return "online", "credentials found"
    return "offline", "no credentials"


def dashboard_config(cfg_container: dict, identity: dict, **extra: Any) -> dict:
    """The config a W&B run records: flat keys to group and filter by (``arm``, ``dataset``, ``seed`` and every
    config choice: ``loss``, ``data``, ``model``...), then the whole resolved config under ``config``.

    Flat choice names equal what a W&B sweep sets (``loss=minimax``), so a sweep's plain strings never replace a
    nested setting: those live under ``config.*``.
    """
    choices = {k: v for k, v in (identity.get("choices") or {}).items() if v is not None}
    flat = {
        "arm": choices.get("loss") or str(cfg_container.get("loss", {}).get("_target_", "?")).rsplit(".", 1)[-1],
        "dataset": choices.get("data") or str(cfg_container.get("data", {}).get("_target_", "?")).rsplit(".", 1)[-1],
        "seed": cfg_container.get("seed"),
        **choices,
        "tricks": sorted((cfg_container.get("tricks") or {}).keys()),
    }
    return {**flat, **extra, "config": cfg_container, "identity": identity}


def run_name(config: dict) -> str:
    """``ring8/minimax/s3``: data set, arm, seed."""
    return f"{config['dataset']}/{config['arm']}/s{config['seed']}"


class Logging:
    """What a run logs to, in words, for its one start line (``metrics.csv + W&B offline (no credentials)``)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def __str__(self) -> str:
        return " + ".join(self.parts) or "nothing"


def make_loggers(
    cfg: Any,
    run_dir: Path,
    run_config: dict,
    *,
    wandb_id: str | None = None,
    keep_until: int | None = None,
    history: Path | None = None,
    said: Logging | None = None,
    record_config: bool = True,
) -> list[Logger]:
    """The CSV logger (``metrics.csv`` in the run folder) and, unless disabled, the W&B logger.

    ``run_config`` is what W&B records (:func:`dashboard_config`). ``keep_until``: the generator step a resumed
    run continues from (its CSV keeps the rows up to it); ``history``: the source run's ``metrics.csv`` when
    resuming into a new folder. ``record_config=False``: the W&B run's config is left as it is (an evaluation
    logging into a training run must not replace the config that run trained with). ``said`` collects, in words,
    where the run logs. An unreachable W&B server never stops training for long: online start gives up after
    ``W_AND_B_TIMEOUT_S`` and the run logs offline.
    """
    said = said if said is not None else Logging()
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(RunCSVLogger(run_dir, keep_until=keep_until, history=history))
        said.parts.append("metrics.csv")
    wb = cfg.get("wandb")
    if wb is None:
        return loggers
    mode, why = resolve_wandb_mode(str(wb.mode))
    if mode == "disabled":
        return loggers
    identity = run_config.get("identity", {})
    kwargs = dict(
        project=wb.project,
        entity=wb.entity,
        group=wb.group or identity.get("sweep"),
        tags=list(wb.tags),
        name=wb.name or run_name(run_config),
        save_dir=str(run_dir),
        config=run_config if record_config else None,
        id=wandb_id,
        resume="allow" if wandb_id else None,
    )
    import wandb

    try:
        settings = wandb.Settings(silent=True, init_timeout=W_AND_B_TIMEOUT_S)
        logger = StepWandbLogger(mode=mode, settings=settings, **kwargs)
        _ = logger.experiment  # start now, so a failure surfaces here and not mid-training
    except Exception as exc:
        if mode != "online":
            raise
        wandb.teardown()
        mode, why = "offline", f"online start failed: {exc.__class__.__name__}"
        logger = StepWandbLogger(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
        _ = logger.experiment
    if mode == "offline":
        said.parts.append(f"W&B offline ({why}; upload later: wandb sync {run_dir}/wandb/offline-run-*)")
    else:
        said.parts.append(f"W&B {mode} ({getattr(logger.experiment, 'url', None) or why})")
    loggers.append(logger)
    return loggers


def finish_wandb(loggers: list[Logger], exit_code: int = 0) -> None:
    """Close the W&B run (in a multirun the next job would otherwise log into this one)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=exit_code)
