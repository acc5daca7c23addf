"""Compose a run from its config and train it: the body of ``src/train.py``.

The run folder (Hydra's working directory for the job) receives ``config.yaml`` (resolved), ``metrics.csv``,
``summary.json``, ``samples/``, ``checkpoints/last.ckpt`` and the W&B files.
"""

from __future__ import annotations

import logging
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

from ganlab.callbacks import PeriodicCheckpoint, SampleGrid, StepProgress
from ganlab.data import describe
from ganlab.errors import UserError
from ganlab.record import RunRecord, resolve_resume
from ganlab.tasks.gan import GANModule
from ganlab.tracking import finish_wandb, make_loggers
from ganlab.tricks.base import Trick, network_args


def validate(cfg: DictConfig) -> None:
    """Reject settings that would fail late or train nonsense, with a one-line reason."""

    def positive_int(key: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{key} must be a positive integer (got {value!r})")

    for key in ("d_steps", "max_steps", "log_every", "sample_every", "ckpt_every"):
        positive_int(key, cfg[key])
    if cfg.batch_size is not None:
        positive_int("batch_size", cfg.batch_size)
    if cfg.metrics is not None:
        metrics_callback(cfg)  # its constructor checks the metrics keys: fail before any data is loaded
    for player in ("optim_g", "optim_d"):
        opt = cfg.model[player]
        if not float(opt.lr) > 0:
            raise UserError(f"model.{player}.lr must be > 0 (got {opt.lr})")
        betas = list(opt.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise UserError(f"model.{player}.betas must be two numbers in [0, 1) (got {betas})")


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
    tricks: list[Trick] = [instantiate(t) for t in cfg.tricks.values() if t is not None]
    # structural tricks reach the networks only through generic arguments (a normalisation, inserted layers)
    try:
        g_args, d_args = network_args(tricks, "G"), network_args(tricks, "D")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    generator = instantiate(cfg.model.generator, out_shape=data.shape, **g_args)
    discriminator = instantiate(cfg.model.discriminator, in_shape=data.shape, **d_args)
    objective = instantiate(cfg.loss)
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


def metrics_callback(cfg: DictConfig) -> pl.Callback:
    """The ``metrics`` node instantiated (``ganlab.metrics.callback.Evaluation``); a bad key is a UserError."""
    try:
        return instantiate(cfg.metrics)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (UserError, ValueError)):
            raise UserError(str(exc.__cause__)) from None
        raise


def callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    """Sample grids, evaluation (before the checkpoint, so a checkpoint follows its evaluation), checkpoints,
    progress. ``metrics=none`` makes ``cfg.metrics`` null: no evaluation."""
    out: list[pl.Callback] = [SampleGrid(run_dir, cfg.sample_every)]
    if cfg.metrics is not None:
        out.append(metrics_callback(cfg))
    return [*out, PeriodicCheckpoint(run_dir, cfg.ckpt_every), StepProgress()]


def _quiet_lightning() -> None:
    """Keep the console to our progress lines: Lightning's tips, checkpoint-loading notes and the CSV logger's
    "directory not empty" warning (the run folder always holds config.yaml first) say nothing actionable."""
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


def train(cfg: DictConfig, run_dir: Path, *, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its summary (also written to ``summary.json``, see
    :class:`ganlab.record.RunRecord`)."""
    t0 = time.time()
    _quiet_lightning()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_dir, seed=cfg.seed, **(identity or {}), run_dir=str(run_dir))
    loggers: list = []
    try:
        validate(cfg)
        ckpt = resolve_resume(cfg.resume, run_dir)
        if ckpt is not None:
            record.update(resumed_from=str(ckpt))
            record.adopt_previous(ckpt)
        record.save()
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        if cfg.model.get("threads"):
            torch.set_num_threads(int(cfg.model.threads))
        pl.seed_everything(cfg.seed, workers=False, verbose=False)
        module = build(cfg)
        record.update(data=describe(module.data))  # how the data set is judged and previewed (the report reads it)
        run_config = OmegaConf.to_container(cfg, resolve=True)
        run_config["identity"] = dict(identity or {})
        loggers = make_loggers(cfg.logger, run_dir, run_config, wandb_id=record.previous.get("wandb_id"))
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                record.update(wandb_id=logger.experiment.id, wandb_dir=getattr(logger.experiment, "dir", None))
        record.save()
        cbs = callbacks(cfg, run_dir)
        trainer = pl.Trainer(
            **OmegaConf.to_container(cfg.trainer, resolve=True),
            # under manual optimisation Lightning's global_step advances once per optimizer step
            max_steps=cfg.max_steps * module.schedule.optimizer_steps,
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
        record.update(
            status="completed",
            g_steps=module.g_step,
            d_updates=module.d_updates,
            global_step=trainer.global_step,
            final={k: v for k, v in module.last_logged.items() if not k.startswith("step/")},
            train_time_s=round(time.time() - t_fit, 2),
            eval_time_s=round(sum(getattr(cb, "seconds", 0.0) for cb in cbs), 2),
        )
    except BaseException as exc:
        record.update(status="failed", error=f"{exc.__class__.__name__}: {exc}")
        raise
    finally:
        record.update(wall_time_s=round(time.time() - t0, 2))
        record.save()
        finish_wandb(loggers, exit_code=0 if record["status"] == "completed" else 1)
    return record.data
