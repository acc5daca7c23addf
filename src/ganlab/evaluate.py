"""Evaluate a saved model without training: ``python src/eval.py <run folder or .ckpt> [key=value ...]``.

The run's module is rebuilt from its folder's ``config.yaml`` (with the overrides applied, e.g.
``metrics.n_samples=50000`` for ``fid50k``), the checkpoint's weights are loaded as data
(:func:`ganlab.checkpoint.load`), and the metrics are computed by the very callback the training uses
(:class:`ganlab.metrics.callback.Evaluation`, built from the ``metrics`` node). With the run's own protocol the
numbers are the run's final ones, exactly.

Results go beside the training's, never over them: ``<run>/evals/<protocol>.json`` (a new name when one exists)
and one entry per evaluation in ``<run>/evals/index.json``; ``summary.json`` (the training's record) is not
touched. When the run logged to W&B (``summary.json``'s ``wandb_id``), the metrics go to the same W&B run.
The report (``src/report.py``) adds the metrics of ``evals/*.json`` to the run's own under their own names.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ganlab.errors import UserError

EVALS = "evals"  # the folder of a run that holds its evaluations
INDEX = "index.json"  # the list of every evaluation of the run, oldest first


@dataclass
class LoadedRun:
    """A run folder's config (overrides applied), its summary and the module with the checkpoint's weights."""

    run_dir: Path
    ckpt_path: Path
    cfg: DictConfig
    summary: dict[str, Any]
    module: Any  # ganlab.tasks.gan.GANModule


def locate(target: str | Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` for a run folder (its ``checkpoints/last.ckpt``) or a ``.ckpt`` file."""
    path = Path(target).expanduser()
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        ckpt = path
    elif path.is_dir():
        run_dir, ckpt = path, path / "checkpoints" / "last.ckpt"
    else:
        raise UserError(f"no such run folder or checkpoint: {path}")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml): pass a folder that src/train.py wrote")
    if not ckpt.is_file():
        raise UserError(f"no checkpoint at {ckpt} (the run saved none yet?)")
    return run_dir, ckpt


def run_config(run_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's resolved ``config.yaml`` with ``key=value`` overrides; an unknown key is a one-line error.

    A run trained with ``metrics=none`` gets the default ``metrics`` node (``conf/metrics/default.yaml``)."""
    from ganlab.paths import conf_dir

    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.get("metrics") is None:
        cfg.metrics = OmegaConf.load(conf_dir() / "metrics" / "default.yaml")
    OmegaConf.set_struct(cfg, True)
    for text in overrides:
        key, sep, _ = text.partition("=")
        if not sep or not key:
            raise UserError(f"override {text!r} is not key=value (e.g. metrics.n_samples=50000)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([text]))
        except OmegaConfBaseException as exc:
            reason = str(exc).splitlines()[0]
            raise UserError(f"override {text!r}: {reason}") from None
    return cfg


def load_run(target: str | Path, overrides: Sequence[str] = ()) -> LoadedRun:
    """Rebuild a run's module from its folder and load the checkpoint's weights (and trick states) into it."""
    run_dir, ckpt_path = locate(target)  # bad input first: one line in a second, before torch and Lightning load
    cfg = run_config(run_dir, overrides)
    import pytorch_lightning as pl
    import torch

    from ganlab import threads
    from ganlab.checkpoint import check_weights, load
    from ganlab.pipeline import build
    from ganlab.record import read_json

    threads.apply(cfg.model.get("threads"))
    try:
        ckpt = load(ckpt_path)
    except UserError as exc:  # its messages speak of resuming; here the checkpoint is evaluated
        raise UserError(re.sub(r"^resume: ", "", str(exc))) from None
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    module = build(cfg)
    check_weights(ckpt, module, ckpt_path)
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)  # generator step, trick states
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        module.to("cuda")
    return LoadedRun(run_dir, ckpt_path, cfg, read_json(run_dir / "summary.json"), module)


def wandb_summary(stem: str, g_step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """What an evaluation adds to its run's W&B run: summary values under ``evals/<stem>/`` (``stem``: its file in
    ``evals/``), never history rows. A history row needs a W&B step past the run's last one, which an offline
    evaluation cannot know and a later extension of the run would log over; and its names (``eval/D(G(z))``...)
    would replace the training's last values in the run's summary."""
    return {**{f"evals/{stem}/{k}": v for k, v in metrics.items()}, f"evals/{stem}/g_step": g_step}


def _protocol_name(overrides: Sequence[str]) -> str:
    """A file name for the protocol: the overrides (``metrics.n_samples=50000`` -> ``n_samples50000``)."""
    parts = [re.sub(r"^metrics\.", "", o).replace("=", "") for o in overrides]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_.")
    return name or "run_protocol"


def _new_file(folder: Path, stem: str) -> Path:
    """``folder/stem.json``, or ``stem-2.json``, ``stem-3.json``... : an existing result is never overwritten."""
    path, k = folder / f"{stem}.json", 2
    while path.exists():
        path, k = folder / f"{stem}-{k}.json", k + 1
    return path


def _wandb_loggers(run: LoadedRun) -> list:
    """The run's own W&B run (resumed by id), never a new ``metrics.csv``; [] when the run has no W&B run."""
    from ganlab.tracking import dashboard_config, make_loggers

    wandb_id = run.summary.get("wandb_id")
    logger_cfg = run.cfg.get("logger")
    if not wandb_id or logger_cfg is None or logger_cfg.get("wandb") is None:
        return []
    logger_cfg = OmegaConf.merge(logger_cfg, {"csv": False})
    identity = {k: run.summary.get(k) for k in ("overrides", "choices", "job_num", "sweep")}
    config = dashboard_config(OmegaConf.to_container(run.cfg, resolve=True), identity)
    # config only names the W&B run: the training run's recorded config is left as it trained
    return make_loggers(logger_cfg, run.run_dir, config, wandb_id=wandb_id, record_config=False)


def evaluate(target: str | Path, overrides: Sequence[str] = (), *, log: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint; write ``evals/<protocol>.json`` and its ``evals/index.json`` entry; return the entry.

    ``log``: also send the metrics to the run's W&B run (when it has one)."""
    t0 = time.perf_counter()
    run = load_run(target, overrides)
    from ganlab.pipeline import metrics_callback
    from ganlab.record import read_json, write_json
    from ganlab.tracking import finish_wandb

    folder = run.run_dir / EVALS
    index = folder / INDEX
    if folder.exists() and not folder.is_dir():  # where the results go is checked before the metrics are computed
        raise UserError(f"{folder}: exists and is not a folder (the evaluations go there): move it away")
    if index.exists() and not index.is_file():
        raise UserError(f"{index}: exists and is not a file")
    read_json(index)  # a damaged index is one line, before the work (read again below, just before the write)
    callback = metrics_callback(run.cfg)
    callback.on_fit_start(None, run.module)  # builds the evaluator for the module's data set and device
    metrics = callback.evaluate(SimpleNamespace(loggers=[]), run.module)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot be created ({exc.strerror or exc})") from None
    path = _new_file(folder, _protocol_name(overrides))
    entry = {
        "file": path.name,
        "checkpoint": str(run.ckpt_path),
        "g_step": run.module.g_step,
        "overrides": list(overrides),
        "protocol": {k: run.cfg.metrics.get(k) for k in ("n_samples", "seed", "kid_subset_size")},
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    try:
        write_json(path, entry)
        # read now, not before the hours of metrics: another evaluation of the run may have added its entry since
        write_json(index, {"evals": [*read_json(index).get("evals", []), entry]})
    except OSError as exc:
        raise UserError(f"{exc.filename or folder}: cannot write the evaluation ({exc.strerror or exc})") from None
    if log:
        loggers = _wandb_loggers(run)
        try:
            for logger in loggers:
                logger.experiment.summary.update(wandb_summary(path.stem, run.module.g_step, metrics))
        finally:
            finish_wandb(loggers)
    entry["path"] = str(path)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: one line of metrics and where they were written; bad input exits 2 with one line."""
    parser = argparse.ArgumentParser(
        prog="eval.py",
        description="Evaluate a run's checkpoint (any metric protocol) and write the results into its folder.",
    )
    parser.add_argument("run", help="a run folder (its checkpoints/last.ckpt) or a .ckpt file inside a run folder")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. metrics.n_samples=50000 metrics.kid_subset_size=1000"
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    args = parser.parse_args(argv)
    try:
        entry = evaluate(args.run, args.overrides, log=not args.no_wandb)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = " | ".join(f"{k} {v:.4g}" for k, v in entry["metrics"].items())
    print(f"generator step {entry['g_step']}: {shown}")
    print(f"wrote {entry['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
