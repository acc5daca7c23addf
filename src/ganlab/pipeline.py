"""Compose a run from its config and train it: the body of ``src/train.py``.

The run folder (Hydra's working directory for the job) receives ``config.yaml`` (resolved), ``metrics.csv``,
``summary.json``, ``samples/``, ``checkpoints/last.ckpt`` and the W&B files.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import logging
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from ganlab import threads
from ganlab.callbacks import PeriodicCheckpoint, Preemption, SampleGrid, StepProgress, ThreadGovernor
from ganlab.checkpoint import check_compatible, check_weights, fingerprint, read_checkpoint_step
from ganlab.checkpoint import load as load_checkpoint
from ganlab.data import describe
from ganlab.ddp import GANDDPStrategy, cluster_launched, devices_per_node, launch_rank, world_size
from ganlab.errors import Diverged, Interrupted, UserError
from ganlab.record import RunRecord, git_commit, keep_config, read_json, resolve_resume, write_json, write_text
from ganlab.tasks.gan import GANModule
from ganlab.tracking import Logging, dashboard_config, finish_wandb, kept_rows, make_loggers
from ganlab.tricks.base import Trick, network_args

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def cheap_cuda_check() -> bool:
    """Turn torch's NVML-based CUDA check back off where NVML finds no GPU; True if it did.

    Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that asking whether CUDA is available never
    initialises CUDA in a process that may fork later. Then every ``torch.cuda.is_available()`` loads NVML again
    until CUDA is initialised, and on a machine without a GPU it never is: torch's Adam asks at every ``step()``
    (its graph-capture check), which cost 80-400 us an Adam step here, two of them in every ring8 generator step
    of ~13 ms. Where NVML reports no GPU (or cannot load: no driver) there is nothing a runtime check could
    initialise, so the cheap runtime check (~1 us) answers the same."""
    if os.environ.get(NVML_CHECK) != "1" or torch.cuda._device_count_nvml() > 0:
        return False
    os.environ[NVML_CHECK] = "0"
    return True


cheap_cuda_check()

# keys of the trainer node the pipeline sets itself (in generator steps or from the run folder)
_PIPELINE_TRAINER_KEYS = ("max_steps", "max_epochs", "logger", "callbacks", "default_root_dir", "enable_checkpointing")
_WANDB_MODES = ("auto", "online", "offline", "disabled")


def _positive_int(key: str, value: Any, *, zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        what = "a non-negative integer" if zero else "a positive integer"
        raise UserError(f"{key} must be {what} (got {value!r})")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key} must be a number (got {value!r})")
    return float(value)


def validate(cfg: DictConfig) -> None:
    """Reject settings that would fail late or train nonsense, with a one-line reason naming the key (nothing
    is written before this passes)."""
    _positive_int("seed", cfg.seed, zero=True)
    for key in ("max_steps", "log_every", "sample_every", "ckpt_every"):
        _positive_int(key, cfg[key])
    for key in ("batch_size", "d_steps"):  # null: the data set's default
        if cfg[key] is not None:
            _positive_int(key, cfg[key])
    max_loss = _number("max_loss", cfg.get("max_loss", 1e6))
    if not max_loss > 0:
        raise UserError(f"max_loss must be > 0 (got {max_loss})")
    if cfg.metrics is not None:
        metrics_callback(cfg)  # its constructor checks the metrics keys: fail before any data is loaded
    for player in ("optim_g", "optim_d"):
        opt = cfg.model[player]
        lr = _number(f"model.{player}.lr", opt.lr)
        if not 0 < lr <= 1:  # Adam steps of more than one unit per step only ever explode
            raise UserError(f"model.{player}.lr must be in (0, 1] (got {opt.lr})")
        betas = list(opt.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise UserError(f"model.{player}.betas must be two numbers in [0, 1) (got {betas})")
    if cfg.model.get("threads") is not None and cfg.model.threads != "auto":
        _positive_int("model.threads (or auto)", cfg.model.threads)
    if cfg.model.get("steps_per_call", 1) != "auto":
        _positive_int("model.steps_per_call (or auto)", cfg.model.get("steps_per_call", 1))
    trainer = cfg.trainer
    for key in _PIPELINE_TRAINER_KEYS:
        if key in trainer:
            raise UserError(f"trainer.{key} is set by the pipeline (budgets count generator steps: use max_steps=)")
    _validate_processes(trainer)
    precision = str(trainer.get("precision", "32-true"))
    if precision not in ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true", "64"):
        raise UserError(f"trainer.precision must be 32-true, 16-mixed, bf16-mixed or bf16-true (got {precision})")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU (use auto or cpu)")
    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise UserError(f"trainer.accelerator must be auto, cpu, gpu or mps (got {accelerator})")
    wandb = cfg.logger.get("wandb")
    if wandb is not None and str(wandb.mode) not in _WANDB_MODES:
        raise UserError(f"logger.wandb.mode must be one of {', '.join(_WANDB_MODES)} (got {wandb.mode})")
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise UserError(f"{key} is required (set {key}=...)")


def _validate_processes(trainer: DictConfig) -> None:
    """``trainer.devices`` and ``trainer.num_nodes`` (DDP for more than one process), and the launch they need."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if str(devices) != "auto" and (isinstance(devices, bool) or not str(devices).isdigit() or int(devices) < 1):
        raise UserError(f"trainer.devices must be a positive integer or auto (got {devices!r})")
    if isinstance(nodes, bool) or not str(nodes).isdigit() or int(nodes) < 1:
        raise UserError(f"trainer.num_nodes must be a positive integer (got {nodes!r})")
    strategy = str(trainer.get("strategy", "auto"))
    if strategy not in ("auto", "ddp"):
        raise UserError(f"trainer.strategy must be auto or ddp (got {strategy}): several devices always train with DDP")
    n = devices_per_node(trainer)
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and n > torch.cuda.device_count():
        raise UserError(f"trainer.devices={devices} but this node has {torch.cuda.device_count()} CUDA GPU(s)")
    if n > 1 and accelerator == "mps":
        raise UserError(f"trainer.devices={devices}: several processes need CPUs or CUDA GPUs (not mps)")
    if int(nodes) > 1 and not (cluster_launched() or "NODE_RANK" in os.environ or "GROUP_RANK" in os.environ):
        raise UserError(
            f"trainer.num_nodes={nodes} needs one launch per node: SLURM (hydra/launcher=slurm "
            f"hydra.launcher.nodes={nodes}), torchrun, or NODE_RANK, MASTER_ADDR and MASTER_PORT set on each node"
        )
    world = n * int(nodes)
    if world > 1 and SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", world)) != world:
        raise UserError(
            f"trainer.devices={devices} x trainer.num_nodes={nodes} needs {world} SLURM tasks, not "
            f"{os.environ['SLURM_NTASKS']}: set hydra.launcher.tasks_per_node={n} and hydra.launcher.nodes={nodes}"
        )


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
        d_steps=cfg.d_steps or data.d_steps,
        batch_size=cfg.batch_size or data.batch_size,
        max_steps=cfg.max_steps,
        optim_g=OmegaConf.to_container(cfg.model.optim_g),
        optim_d=OmegaConf.to_container(cfg.model.optim_d),
        seed=cfg.seed,
        log_every=cfg.log_every,
        tricks=tricks,
        noise=cfg.model.noise,
        lr_decay=cfg.model.lr_decay,
        lr_decay_from=cfg.model.get("lr_decay_from", 0.0),
        max_loss=cfg.get("max_loss", 1e6),
        steps_per_call=cfg.model.get("steps_per_call", 1),
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


def callbacks(cfg: DictConfig, run_dir: Path, fingerprint: dict[str, Any] | None = None) -> list[pl.Callback]:
    """The thread count's record and governor (watching with ``model.threads=auto``; first, so what follows at a
    step runs on its count), sample grids, evaluation (before the checkpoint, so a checkpoint follows its
    evaluation), checkpoints, preemption (after them: a signal stops the run once the step's work is saved),
    progress. ``metrics=none`` makes ``cfg.metrics`` null: no evaluation."""
    out: list[pl.Callback] = [ThreadGovernor(watch=threads.governed(cfg.model.get("threads")))]
    out.append(SampleGrid(run_dir, cfg.sample_every))
    if cfg.metrics is not None:
        out.append(metrics_callback(cfg))
    checkpoint = PeriodicCheckpoint(run_dir, cfg.ckpt_every, fingerprint)
    return [*out, checkpoint, Preemption(checkpoint), StepProgress()]


# training scalars and D's view of the equilibrium: diagnostics, not results (the final line leaves them out)
_DIAGNOSTIC = ("loss/", "penalty/", "grad_norm/", "lr/", "D(", "eval/", "ssl/train_", "step/")


def final_line(final: Mapping[str, float]) -> str:
    """The one line a finished run prints: its evaluation results (or, without evaluation, its losses)."""
    results = {k: v for k, v in final.items() if not k.startswith(_DIAGNOSTIC) and not k.endswith("_std")}
    shown = results or {k: v for k, v in final.items() if k in ("loss/d", "loss/g")}
    return "final: " + (", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())) or "no metrics")


def _quiet_lightning() -> None:
    """Keep the console to our progress lines: Lightning's tips, checkpoint-loading notes and the CSV logger's
    "directory not empty" warning (the run folder always holds config.yaml first) say nothing actionable."""
    for name in (
        "pytorch_lightning.utilities.rank_zero",
        "pytorch_lightning.trainer.connectors.checkpoint_connector",
        "pytorch_lightning.trainer.connectors.signal_connector",
        "matplotlib",  # its font-cache note on first use
        "lightning_fabric.utilities.distributed",  # DDP's "Initializing distributed: GLOBAL_RANK..." per process
        "lightning_fabric.utilities.rank_zero",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


def make_trainer(
    cfg: DictConfig,
    module: GANModule,
    run_dir: Path,
    loggers: list,
    cbs: list[pl.Callback],
    *,
    workers: Mapping[str, Any] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> pl.Trainer:
    """The Lightning Trainer of a run: the budget in optimizer steps read from the module's schedule, the
    project's own progress, checkpoints and logging (Lightning's are off).

    More than one process (``trainer.devices`` x ``trainer.num_nodes``): :class:`~ganlab.ddp.GANDDPStrategy`, which
    starts this node's other ranks with ``workers`` (the run's resolved config, folder and checkpoint) and calls
    ``on_failure`` if one of them dies."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    if world_size(cfg.trainer) > 1:
        kwargs["strategy"] = GANDDPStrategy(payload=workers, on_failure=on_failure)
        kwargs["use_distributed_sampler"] = False  # the data loader only ticks; each rank samples its own batches
    return pl.Trainer(
        **kwargs,
        # under manual optimisation Lightning's global_step advances once per optimizer step
        max_steps=cfg.max_steps * module.schedule.optimizer_steps,
        logger=loggers or False,
        callbacks=cbs,
        default_root_dir=str(run_dir),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # nothing is logged through Lightning's self.log (the module logs to the loggers itself): 0 spares its logger
        # connector a pass over the (empty) step metrics every step
        log_every_n_steps=0,
        # submitit requeues preempted jobs; Lightning's own SLURM auto-requeue would be a second mechanism
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
    )


def _writable(run_dir: Path) -> None:
    """Fail in one line when the run folder cannot be created or written (before anything else is)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"run folder {run_dir} is not writable ({exc.strerror or exc})") from None


def _resume_point(cfg: DictConfig, run_dir: Path, previous: Mapping[str, Any]) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its contents, or ``(None, None)`` for a fresh run; refuses what would
    lose or fake a record (a fresh run, or a resume from another folder's checkpoint, over an existing run; a budget
    below the checkpoint's step)."""
    ckpt = resolve_resume(cfg.resume, run_dir)
    if ckpt is None:
        if previous and cfg.resume in (None, ""):
            raise UserError(
                f"{run_dir} already holds a run ({previous.get('status', 'unknown')}): resume=auto continues it, "
                "another folder starts a new one"
            )
        if previous.get("status") == "completed":  # resume=auto: its checkpoint is gone, its record stays
            raise UserError(
                f"{run_dir} holds a completed run but no checkpoints/last.ckpt: nothing to resume from (another "
                "folder starts a new run)"
            )
        return None, None
    holds = previous or any((run_dir / name).exists() for name in ("checkpoints/last.ckpt", "metrics.csv"))
    if holds and not same_folder(ckpt, run_dir):
        raise UserError(
            f"{run_dir} already holds a run ({previous.get('status', 'unknown')}): a resume from another run's "
            f"checkpoint ({ckpt}) needs a new folder (resume=auto continues this folder's own run)"
        )
    state = load_checkpoint(ckpt)
    step = int(state["ganlab"]["g_step"])
    if step > cfg.max_steps:
        raise UserError(f"max_steps={cfg.max_steps} is below the checkpoint's generator step {step} ({ckpt})")
    last = run_dir / "checkpoints" / "last.ckpt"
    newest = read_checkpoint_step(last) if same_folder(ckpt, run_dir) and ckpt.resolve() != last.resolve() else None
    if newest is not None and newest > step:  # an earlier checkpoint of this folder (a kept step_<N>.ckpt)
        raise UserError(
            f"{ckpt} is at generator step {step}, behind this folder's last.ckpt (step {newest}): training from it "
            f"here would rewrite the rows and samples after step {step}; branch it into a new folder (resume={ckpt} "
            "with another hydra.run.dir)"
        )
    return ckpt, state


def same_folder(ckpt: Path, run_dir: Path) -> bool:
    """Whether ``ckpt`` is one of ``run_dir``'s own checkpoints."""
    return ckpt.parent.parent.resolve() == run_dir.resolve()


def keep_checkpoint(ckpt: Path, step: int) -> str:
    """Copy ``ckpt`` (a completed run's ``last.ckpt``, about to be extended and overwritten) to
    ``checkpoints/step_<step>.ckpt`` beside it, atomically; an existing copy is kept as it is. Returns the copy's
    path relative to the run folder."""
    target = ckpt.parent / f"step_{step:07d}.ckpt"
    if not target.exists():
        tmp = target.with_suffix(".tmp")
        try:
            shutil.copy2(ckpt, tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    return str(target.relative_to(ckpt.parent.parent))


def saved_threads(state: Mapping[str, Any] | None) -> int | None:
    """The thread count a resumed run trained with (checkpoints from before it was saved: None)."""
    return state["ganlab"].get("threads") if state is not None else None


def resolved_sizes(module: GANModule) -> dict[str, int]:
    """``batch_size`` and ``d_steps`` as the run resolved them (null in the config: the data set's default): what
    the checkpoint fingerprint, ``summary.json`` and the W&B config hold."""
    return {"batch_size": module.batch_size, "d_steps": module.schedule.count("D")}


def ranks_started_here(cfg: DictConfig) -> int:
    """Processes of this run that this process starts on its node (and so shares its cores with): the devices
    per node of a multi-process run the project launches itself, else 1 (one process, or each started by SLURM
    or torchrun with its own CPU allotment)."""
    if world_size(cfg.trainer) > 1 and not cluster_launched():
        return devices_per_node(cfg.trainer)
    return 1


def train_rank(cfg: DictConfig, run_dir: Path | str, ckpt: Path | str | None) -> dict[str, Any]:
    """Train as a rank > 0 of a DDP run: the same module, callbacks and Trainer as rank 0 (every callback acts in
    step with it), from the same checkpoint, writing nothing (no record, config, loggers or files: rank 0 writes the
    run). Returns what this rank ended with (steps, updates, final values); a stop of the run (interrupted,
    diverged) is raised as on rank 0."""
    _quiet_lightning()
    run_dir = Path(run_dir)
    state = load_checkpoint(Path(ckpt)) if ckpt else None
    if state is not None and int(state["ganlab"]["g_step"]) >= cfg.max_steps:
        return {"status": "nothing to train"}  # rank 0 says why (complete, or nothing to extend)
    threads.apply(cfg.model.get("threads"), saved_threads(state))
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    module = build(cfg)
    current = fingerprint(cfg, **resolved_sizes(module))
    if state is not None:  # what rank 0 refuses, this rank refuses too (a SLURM-started rank would otherwise wait
        check_compatible(state, current, Path(ckpt))  # at the rendezvous for a rank 0 that has left)
        check_weights(state, module, Path(ckpt))
    cbs = callbacks(cfg, run_dir, current)
    preemption = next(cb for cb in cbs if isinstance(cb, Preemption))
    preemption.install()
    try:
        trainer = make_trainer(cfg, module, run_dir, [], cbs)
        trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    finally:
        preemption.restore()
    return {
        "rank": trainer.global_rank,
        "g_steps": module.g_step,
        "d_updates": module.d_updates,
        "final": {k: v for k, v in module.last_logged.items() if not k.startswith("step/")},
    }


def _finish_signal(exc: Interrupted, previous: Mapping[int, Any]) -> None:
    """Hand a preemption signal on to the handler that was there before ours (submitit requeues the job on USR2)."""
    handler = previous.get(exc.signum)
    if callable(handler) and exc.signum == signal.SIGUSR2:
        handler(exc.signum, None)


def _restart(record: RunRecord, run_dir: Path) -> None:
    """Start again from step 0 in a folder whose earlier attempt left no checkpoint, keeping that attempt's
    ``metrics.csv`` and ``config.yaml`` as ``metrics.attempt<N>.csv`` and ``config.attempt<N>.yaml`` (its record in
    ``attempts``); says so in one line."""
    number = record.restart()
    kept = []
    rows = run_dir / "metrics.csv"
    target, k = run_dir / f"metrics.attempt{number}.csv", 2
    while target.exists():
        target, k = run_dir / f"metrics.attempt{number}-{k}.csv", k + 1
    if rows.is_file():
        rows.replace(target)  # atomic: the rows are in one file or the other, never lost
        kept.append(target.name)
    config = keep_config(run_dir, number)
    if config is not None:
        kept.append(config)
    record["attempts"][-1]["kept"] = kept
    print(
        f"no checkpoint in {run_dir} (attempt {number} stopped before its first): training from generator step 0"
        + (f"; attempt {number}'s files kept as {' and '.join(kept)}" if kept else ""),
        flush=True,
    )


def final_from_csv(path: Path, step: int) -> dict[str, float]:
    """What a run's ``final`` would hold, read back from its ``metrics.csv``: each column's last value logged at or
    before generator step ``step`` (``step/*`` columns left out, as in ``final``); ``{}`` without the file."""
    final: dict[str, float] = {}
    if not path.is_file():
        return final
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                if int(float(row.get("step") or "nan")) > step:
                    continue
            except ValueError:
                continue
            for key, value in row.items():
                if key and key != "step" and not key.startswith("step/") and value not in (None, ""):
                    with contextlib.suppress(ValueError):
                        final[key] = float(value)
    return final


def _complete_from_checkpoint(
    run_dir: Path, ckpt: Path, state: Mapping[str, Any], previous: Mapping[str, Any]
) -> dict[str, Any]:
    """Close the record of a run whose last step was trained, evaluated and saved but whose record never said so
    (a signal in its last step, a kill before the record's last write): nothing is left to train, so the record
    becomes ``completed`` with the final values its ``metrics.csv`` holds; no other file changes. What the record
    said before is kept in the new entry of ``attempts``."""
    step = int(state["ganlab"]["g_step"])
    final = final_from_csv(run_dir / "metrics.csv", step) or dict(previous.get("final") or {})
    data = {k: v for k, v in previous.items() if k not in ("error", "resume")}
    attempts = list(previous.get("attempts") or [])
    attempts.append(
        {
            "completed_from": str(ckpt),
            "from_step": step,
            "git_commit": git_commit(),
            "before": {k: previous[k] for k in ("status", "error", "g_steps", "final") if k in previous},
            "note": "no step left to train: the record was completed from the checkpoint and metrics.csv",
        }
    )
    data.update(
        status="completed",
        g_steps=step,
        d_updates=int(state["ganlab"].get("d_updates", previous.get("d_updates", 0))),
        final=final,
        attempts=attempts,
    )
    if "global_step" in state:
        data["global_step"] = int(state["global_step"])
    try:
        write_json(run_dir / "summary.json", data)
    except OSError as exc:
        raise UserError(f"cannot write {run_dir / 'summary.json'} ({exc.strerror or exc})") from None
    print(
        f"run already at its last step ({step} generator steps) but recorded as {previous.get('status', 'unknown')}: "
        f"record completed from its checkpoint: {run_dir}",
        flush=True,
    )
    print(final_line(final), flush=True)
    return data


def train(cfg: DictConfig, run_dir: Path, *, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its summary (also written to ``summary.json``, see
    :class:`ganlab.record.RunRecord`).

    A finished run is never trained or rewritten again: re-running it (``resume=auto``, what a requeued cluster job
    passes) says it is complete and changes no file; ``resume=<run> max_steps=<more>`` extends it. A resumed run
    keeps its metric history and its W&B run. SIGTERM/SIGUSR2 write the checkpoint of the current step and end
    with ``status: interrupted``; a diverging loss ends with ``status: diverged`` and leaves ``last.ckpt`` at the
    last good state.
    """
    t0 = time.time()
    _quiet_lightning()
    run_dir = Path(run_dir)
    validate(cfg)  # nothing is written for bad input
    world = world_size(cfg.trainer)
    if world > 1 and launch_rank(devices_per_node(cfg.trainer)) != 0:
        # a rank that SLURM or torchrun started itself: it trains along and writes nothing (rank 0 keeps the record)
        return train_rank(cfg, run_dir, resolve_resume(cfg.resume, run_dir))
    previous = read_json(run_dir / "summary.json")
    ckpt, state = _resume_point(cfg, run_dir, previous)
    if state is not None and int(state["ganlab"]["g_step"]) == cfg.max_steps:
        own = same_folder(ckpt, run_dir)
        if own and previous.get("status") == "completed":
            print(f"run already complete ({cfg.max_steps} generator steps): {run_dir}", flush=True)
            return previous
        if own and previous:  # stopped after its last step was saved (a signal in it, a kill before the end)
            return _complete_from_checkpoint(run_dir, ckpt, state, previous)
        raise UserError(
            f"the checkpoint is already at max_steps={cfg.max_steps}: nothing to train (raise max_steps to extend "
            "the run, or evaluate it with src/eval.py)"
        )
    _writable(run_dir)
    record = RunRecord(run_dir, seed=cfg.seed, **(identity or {}), run_dir=str(run_dir))
    loggers: list = []
    cbs: list[pl.Callback] = []
    preemption: Preemption | None = None
    interrupted: Interrupted | None = None
    trainer: pl.Trainer | None = None
    fitted = False
    t_fit: float | None = None  # when training began, and ended (None: it did not)
    t_fitted: float | None = None
    # a folder that holds a run changes in nothing until every check (load, build, compatibility) has passed; a
    # new one records from the start, so a run that fails while building says why (summary.json, config.yaml)
    written = early = not previous and not any(run_dir.iterdir())
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    try:
        if early:
            record.save()
            write_text(run_dir / "config.yaml", config_text)
        if ckpt is not None:
            record.resume_from(ckpt, int(state["ganlab"]["g_step"]))
        # auto: the cores free now (a resume reuses the saved count: results depend on it), split among the
        # ranks this process starts on the node; the DDP launcher hands every rank this same count
        record.update(threads=threads.apply(cfg.model.get("threads"), saved_threads(state), ranks_started_here(cfg)))
        pl.seed_everything(cfg.seed, workers=False, verbose=False)
        module = build(cfg)
        resolved = resolved_sizes(module)
        current = fingerprint(cfg, **resolved)
        if state is not None:
            check_compatible(state, current, ckpt)
            check_weights(state, module, ckpt)
            rows = run_dir / "metrics.csv" if same_folder(ckpt, run_dir) else ckpt.parent.parent / "metrics.csv"
            if cfg.logger.get("csv") and rows.is_file():
                kept_rows(rows, int(state["ganlab"]["g_step"]))  # a damaged history is refused before any write
        written = True  # from here on the run owns the folder: its record says how it ends
        if ckpt is None and (previous or (run_dir / "metrics.csv").is_file()):
            _restart(record, run_dir)  # resume=auto, but the earlier attempt stopped before its first checkpoint
        last = run_dir / "checkpoints" / "last.ckpt"
        if state is not None and record.previous.get("status") == "completed" and same_folder(ckpt, run_dir):
            # the completed run's checkpoint stays: this attempt overwrites last.ckpt
            step = int(state["ganlab"]["g_step"]) if ckpt.resolve() == last.resolve() else read_checkpoint_step(last)
            if step is not None:
                record.note_attempt(kept_checkpoint=keep_checkpoint(last, step))
        if (
            ckpt is not None and record.continued and same_folder(ckpt, run_dir)
        ):  # the earlier attempt's config stays beside the new one
            kept = keep_config(run_dir, len(record["attempts"]))
            if kept is not None:
                record["attempts"][-1]["before"]["config"] = kept
        record.save()
        if not early:  # a new folder has had its config.yaml since the start
            write_text(run_dir / "config.yaml", config_text)
        record.update(data=describe(module.data))  # how the data set is judged and previewed (the report reads it)
        n_params = {f"params/{name.lower()}": sum(p.numel() for p in net.parameters()) for name, net in
                    (("G", module.G), ("D", module.D))}  # fmt: skip
        record.update(**n_params, **resolved)
        run_config = dashboard_config(
            {**OmegaConf.to_container(cfg, resolve=True), **resolved}, dict(identity or {}), **n_params
        )
        said = Logging()
        history = None
        if ckpt is not None and not same_folder(ckpt, run_dir):
            history = ckpt.parent.parent / "metrics.csv"  # resumed into a new folder: start from the source's rows
        loggers = make_loggers(
            cfg.logger,
            run_dir,
            run_config,
            wandb_id=record.previous.get("wandb_id") if ckpt is not None else None,  # a restart: a new W&B run
            keep_until=int(state["ganlab"]["g_step"]) if state is not None else None,
            history=history,
            said=said,
        )
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                record.update(wandb_id=logger.experiment.id, wandb_dir=getattr(logger.experiment, "dir", None))
        record.save()
        cbs = callbacks(cfg, run_dir, current)
        preemption = next(cb for cb in cbs if isinstance(cb, Preemption))
        preemption.install()  # a signal from here on stops the run at a step boundary, with a checkpoint
        workers = {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "run_dir": str(run_dir.resolve()),
            "resume": str(Path(ckpt).resolve()) if ckpt else None,
        }

        def worker_failed(reason: str) -> None:
            record.update(status="failed", error=reason)
            record.add_times(wall_time_s=round(time.time() - t0, 2))
            record.try_save()

        try:
            trainer = make_trainer(cfg, module, run_dir, loggers, cbs, workers=workers, on_failure=worker_failed)
        except (ValueError, MisconfigurationException) as exc:
            raise UserError(f"trainer: {str(exc).splitlines()[0]}") from None
        device = trainer.strategy.root_device.type
        if world > 1:
            device = f"{world} x {device} (DDP, batch_size {module.batch_size} per process)"
        start = f"from generator step {state['ganlab']['g_step']} " if state is not None else ""
        print(
            f"training {cfg.max_steps} generator steps {start}on {device} in {run_dir}, logging to {said}", flush=True
        )
        t_fit = time.time()
        trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        t_fitted = time.time()
        fitted = True
        record.update(
            status="completed",
            g_steps=module.g_step,
            d_updates=module.d_updates,
            global_step=trainer.global_step,
            final={k: v for k, v in module.last_logged.items() if not k.startswith("step/")},
        )
        print(final_line(record["final"]), flush=True)
    except Interrupted as exc:
        interrupted = exc
        record.update(
            status="interrupted",
            g_steps=exc.step,
            error=str(exc),
            resume=f"checkpoint at generator step {exc.step}: rerun with resume=auto (this folder) or resume={run_dir}",
        )
        raise Interrupted(
            f"{exc}: checkpoint written; continue with resume=auto or resume={run_dir}", exc.signum, exc.step
        ) from None
    except Diverged as exc:
        good = read_checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
        where = f"last good checkpoint: generator step {good}" if good is not None else "no checkpoint was written"
        record.update(status="diverged", g_steps=exc.step, error=str(exc))
        raise Diverged(f"{exc}; {where}", exc.step) from None
    except BaseException as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
        dead = launcher.dead(wait_s=2.0) if hasattr(launcher, "dead") else None
        if dead:  # DDP: the other rank's end is the cause, the collective's error only its echo
            reason = f"{dead} ({reason})"
        record.update(status="failed", error=f"{exc.__class__.__name__}: {reason}")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise UserError(f"cannot write the run's files ({exc.strerror}): {run_dir}") from None
        raise
    finally:
        # our signal handlers stay until the record and W&B are written: a SIGTERM now (SLURM's time limit, a
        # kill at the final line) must not kill the process between a finished run and its record
        launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
        if hasattr(launcher, "finish"):  # DDP: the other local ranks end with this one
            launcher.finish(ok=fitted or interrupted is not None)
        if t_fit is not None:  # this attempt's own times; the top level holds the folder's totals
            fit_end = t_fitted if t_fitted is not None else time.time()
            record.add_times(
                train_time_s=round(fit_end - t_fit, 2),
                eval_time_s=round(sum(getattr(cb, "seconds", 0.0) for cb in cbs), 2),
            )
        record.add_times(wall_time_s=round(time.time() - t0, 2))
        record.note_attempt(status=record["status"], g_steps=record.data.get("g_steps"))
        governor = next((cb for cb in cbs if isinstance(cb, ThreadGovernor)), None)
        if governor is not None:  # else it stopped before training: a resumed folder's earlier record stays
            record.update(thread_changes=governor.changes)
        saved = record.try_save() if written else True  # refused before its first write: the folder is as it was
        finish_wandb(loggers, exit_code=0 if record["status"] == "completed" else 1)
        if preemption is not None:
            preemption.restore()  # a signal after the run completed stops nothing: the record is whole
            if interrupted is not None:
                _finish_signal(interrupted, preemption.previous)
    if not saved:
        raise UserError(f"cannot write {record.path} (disk full or folder removed?)")
    return record.data
