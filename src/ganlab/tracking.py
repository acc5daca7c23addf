"""Loggers: a CSV file in the run folder, and Weights & Biases that never blocks on a login prompt."""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

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


def make_loggers(cfg: Any, run_dir: Path, run_config: dict, *, wandb_id: str | None = None) -> list[Logger]:
    """The CSV logger (``metrics.csv`` in the run folder) and, unless disabled, the W&B logger.

    An unreachable W&B server never stops training: a failed online start falls back to offline logging.
    """
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
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
    try:
        logger = WandbLogger(mode=mode, **kwargs)
        _ = logger.experiment  # start now, so a failure surfaces here and not mid-training
    except Exception as exc:
        if mode != "online":
            raise
        import wandb

        warnings.warn(f"W&B online start failed ({exc.__class__.__name__}: {exc}); logging offline", stacklevel=1)
        wandb.teardown()
        logger = WandbLogger(mode="offline", **kwargs)
        _ = logger.experiment
    loggers.append(logger)
    return loggers


def finish_wandb(loggers: list[Logger], exit_code: int = 0) -> None:
    """Close the W&B run (in a multirun the next job would otherwise log into this one)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=exit_code)
