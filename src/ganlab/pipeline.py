"""Compose a run from its config and train it: the body of ``src/train.py``.

The run folder (Hydra's working directory for the job) receives ``config.yaml`` (resolved), ``metrics.csv``,
``summary.json``, ``samples/``, ``checkpoints/last.ckpt`` and the W&B files.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from ganlab.callbacks import Evaluation, PeriodicCheckpoint, SampleGrid, StepProgress
from ganlab.errors import UserError
from ganlab.module import GANModule, Trick
from ganlab.tracking import finish_wandb, make_loggers

SRC_ROOT = Path(__file__).resolve().parents[2]


def validate(cfg: DictConfig) -> None:
    """Reject settings that would fail late or train nonsense, with a one-line reason."""

    def positive_int(key: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{key} must be a positive integer (got {value!r})")

    for key in ("d_steps", "max_steps", "log_every", "sample_every", "ckpt_every"):
        positive_int(key, cfg[key])
    if cfg.batch_size is not None:
        positive_int("batch_size", cfg.batch_size)
    if cfg.metrics.enabled:
        positive_int("metrics.eval_every", cfg.metrics.eval_every)
        if cfg.metrics.n_samples is not None:
            positive_int("metrics.n_samples", cfg.metrics.n_samples)
        weights = cfg.metrics.inception_weights
        if weights is not None and not Path(str(weights)).expanduser().is_file():
            raise UserError(f"metrics.inception_weights: no file at {weights}")
    for player in ("optim_g", "optim_d"):
        opt = cfg.model[player]
        if not float(opt.lr) > 0:
            raise UserError(f"model.{player}.lr must be > 0 (got {opt.lr})")
        betas = list(opt.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise UserError(f"model.{player}.betas must be two numbers in [0, 1) (got {betas})")


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


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def build(cfg: DictConfig) -> GANModule:
    """Instantiate data, networks, objective and tricks from the config (``_target_`` is the registry).

    Hydra wraps a constructor's exception in ``InstantiationException``; a :class:`UserError` (bad setting,
    missing data) is unwrapped so the user gets its one line, and a ``ValueError`` from a constructor's argument
    check becomes one.
    """
    try:
        return _build(cfg)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise UserError(str(cause)) from None
        raise


def _build(cfg: DictConfig) -> GANModule:
    data = instantiate(cfg.data)
    data.setup()
    generator = instantiate(cfg.model.generator, out_shape=data.shape)
    discriminator = instantiate(cfg.model.discriminator, in_shape=data.shape)
    objective = instantiate(cfg.loss)
    # tricks with a _target_ are hook objects; the others are settings read by the network builders
    tricks: list[Trick] = [instantiate(t) for t in cfg.tricks.values() if t is not None and "_target_" in t]
    return instantiate(
        cfg.task,
        generator,
        discriminator,
        objective,
        data,
        d_steps=cfg.d_steps,
        batch_size=cfg.batch_size or data.batch_size,
        max_steps=cfg.max_steps,
        optim_g=OmegaConf.to_container(cfg.model.optim_g),
        optim_d=OmegaConf.to_container(cfg.model.optim_d),
        seed=cfg.seed,
        log_every=cfg.log_every,
        tricks=tricks,
        noise=cfg.model.noise,
        lr_decay=cfg.model.lr_decay,
        _recursive_=False,
    )


def callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    """Sample grids, evaluation (before the checkpoint, so a checkpoint follows its evaluation), checkpoints,
    progress."""
    out: list[pl.Callback] = [SampleGrid(run_dir, cfg.sample_every)]
    m = cfg.metrics
    if m.enabled:
        out.append(Evaluation(m.eval_every, m.n_samples, m.seed, m.kid_subset_size, m.inception_weights, m.cache_dir))
    return [*out, PeriodicCheckpoint(run_dir, cfg.ckpt_every), StepProgress()]


def _quiet_lightning() -> None:
    """Keep the console to our progress lines: Lightning's tips, checkpoint-loading notes and the CSV logger's
    "directory not empty" warning (the run folder always holds config.yaml first) say nothing actionable."""
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


def train(cfg: DictConfig, run_dir: Path, *, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its summary (also written to ``summary.json``).

    ``summary.json`` is written with ``status: running`` first and ``completed`` or ``failed`` last, so a sweep
    can tell a crashed job from a finished one without W&B.
    """
    t0 = time.time()
    _quiet_lightning()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary: dict[str, Any] = {
        "status": "running",
        "seed": cfg.seed,
        "git_commit": git_commit(),
        **(identity or {}),
        "run_dir": str(run_dir),
    }
    loggers: list = []
    try:
        validate(cfg)
        ckpt = resolve_resume(cfg.resume, run_dir)
        if ckpt is not None:
            summary["resumed_from"] = str(ckpt)
            src_summary = ckpt.parent.parent / "summary.json"
            if src_summary.is_file() and src_summary != summary_path:
                previous = json.loads(src_summary.read_text())
        _write_json(summary_path, summary)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        if cfg.model.get("threads"):
            torch.set_num_threads(int(cfg.model.threads))
        pl.seed_everything(cfg.seed, workers=False, verbose=False)
        module = build(cfg)
        run_config = OmegaConf.to_container(cfg, resolve=True)
        run_config["identity"] = dict(identity or {})
        loggers = make_loggers(cfg.logger, run_dir, run_config, wandb_id=previous.get("wandb_id"))
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                summary["wandb_id"] = logger.experiment.id
                summary["wandb_dir"] = getattr(logger.experiment, "dir", None)
        _write_json(summary_path, summary)
        cbs = callbacks(cfg, run_dir)
        trainer = pl.Trainer(
            **OmegaConf.to_container(cfg.trainer, resolve=True),
            # under manual optimisation Lightning's global_step advances once per optimizer step
            max_steps=cfg.max_steps * (cfg.d_steps + 1),
            logger=loggers or False,
            callbacks=cbs,
            default_root_dir=str(run_dir),
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        device = trainer.strategy.root_device.type
        print(f"training {cfg.max_steps} generator steps on {device}, run folder: {run_dir}", flush=True)
        t_fit = time.time()
        trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None)
        summary.update(
            status="completed",
            g_steps=module.g_step,
            d_steps_done=module.d_step,
            global_step=trainer.global_step,
            final={k: v for k, v in module.last_logged.items() if not k.startswith("step/")},
            train_time_s=round(time.time() - t_fit, 2),
            eval_time_s=round(sum(cb.seconds for cb in cbs if isinstance(cb, Evaluation)), 2),
        )
    except BaseException as exc:
        summary.update(status="failed", error=f"{exc.__class__.__name__}: {exc}")
        raise
    finally:
        summary["wall_time_s"] = round(time.time() - t0, 2)
        _write_json(summary_path, summary)
        finish_wandb(loggers, exit_code=0 if summary["status"] == "completed" else 1)
    return summary
