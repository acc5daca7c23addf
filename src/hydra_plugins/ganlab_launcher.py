"""Launchers of this project's sweeps (``conf/hydra/launcher/``); Hydra instantiates launchers only from the
``hydra_plugins`` namespace package, hence this module's place.

- :class:`CappedLocalLauncher` (``hydra/launcher=local``): submitit's local launcher starts every job of a sweep at
  once; on two cores twenty GAN runs then thrash. This one keeps a *pool* of at most
  ``usable cores // max(cpus_per_task, trainer.devices)`` jobs and starts the next job as soon as one ends (a slow
  arm never idles the other slots). A job gets ``cpus_per_task`` threads (``OMP_NUM_THREADS``), which the ranks of
  a DDP job (``trainer.devices=N``) share, ``max(1, cpus_per_task // N)`` each (:mod:`ganlab.threads`); its N
  processes need N cores however few threads each has.
- :class:`RecipeSlurmLauncher` (``hydra/launcher=slurm``): the plugin's SLURM launcher, with the GPU request read
  from the data sets the jobs train on (``gpus_per_node: null``: 1 for image data, 0 for 2-D/1-D points) and the
  job name from the recipe. Its sbatch script exports ``OMP_NUM_THREADS`` (and MKL's, OpenBLAS's) =
  ``cpus_per_task`` before ``srun`` (:func:`thread_setup`): SLURM starts one task per rank, each with its
  ``cpus_per_task`` cores, and ``model.threads=auto`` takes that count instead of relying on CPU binding (a
  cluster that does not bind tasks to cores would let every rank take all of the node's CPUs).

Both print each submitit log line once inside a job (see :func:`_log_once`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocalLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

from ganlab.threads import usable_cores

log = logging.getLogger(__name__)

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
T = TypeVar("T")
H = TypeVar("H")


@contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """Set the thread-count variables that submitit copies into each job's environment, then restore them."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: str(threads) for k in _THREAD_VARS})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_pool(
    items: Sequence[T],
    cap: int,
    start: Callable[[int, T], H],
    done: Callable[[H], bool],
    *,
    poll_s: float = 0.5,
) -> list[H]:
    """Start ``items`` in order with ``start(index, item)``, never more than ``cap`` unfinished at once, the next one
    as soon as ``done(handle)`` says a slot is free; return the handles in item order once all are done.

    This is the launcher's whole scheduling policy (a pool, not waves), kept free of submitit so it can be tested
    with jobs that only sleep."""
    handles: list[H] = []
    running: list[H] = []
    for index, item in enumerate(items):
        while len(running) >= cap:
            running = [h for h in running if not done(h)]
            if len(running) >= cap:
                time.sleep(poll_s)
        handle = start(index, item)
        handles.append(handle)
        running.append(handle)
    while running:
        running = [h for h in running if not done(h)]
        if running:
            time.sleep(poll_s)
    return handles


def _log_once() -> None:
    """Inside a job: submitit's logger has its own stdout handler *and* propagates to the root logger, to which
    Hydra's job logging adds a console handler; every submitit line (job start, completion, requeue) was then
    printed twice into the job's log. Keep submitit's own handler only."""
    logging.getLogger("submitit").propagate = False


class _OnceLogging(BaseSubmititLauncher):
    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        _log_once()
        return super().__call__(*args, **kwargs)


def job_ranks(trainer_cfg: Any) -> int:
    """Processes one job starts on this machine: ``trainer.devices`` as the run resolves it
    (:func:`ganlab.ddp.devices_per_node`), at least 1. A value the run cannot read counts 1: that job reports it
    in its own one line, the sweep's other jobs run."""
    from ganlab.ddp import devices_per_node  # imports torch: only where a sweep is launched

    try:
        return max(1, devices_per_node(trainer_cfg))
    except (TypeError, ValueError):
        return 1


class CappedLocalLauncher(_OnceLogging, _SubmititLocalLauncher):
    """``submitit_local`` as a pool of at most ``usable_cores() // max(cpus_per_task, trainer.devices)`` parallel
    jobs (the largest ``trainer.devices`` among the sweep's jobs)."""

    def cores_per_job(self, ranks: int = 1) -> int:
        """Cores a job takes: its ``cpus_per_task`` threads, and at least one core per process of a DDP job of
        ``ranks`` processes (each rank runs at least 1 thread)."""
        return max(self.threads(), ranks)

    def max_parallel(self, ranks: int = 1) -> int:
        """How many jobs of ``ranks`` processes each run at once: the usable cores // :meth:`cores_per_job`."""
        return max(1, usable_cores() // self.cores_per_job(ranks))

    def plan(self, jobs: int, ranks: int = 1) -> str:
        """The log line saying how many jobs run at once and why, and how many threads each process takes."""
        threads, per_job = self.threads(), self.cores_per_job(ranks)
        rule = (
            f"{usable_cores()} usable cores // {per_job} per job: max(cpus_per_task {threads}, trainer.devices {ranks})"
        )
        each = f", shared by its {ranks} DDP ranks: {max(1, threads // ranks)} each" if ranks > 1 else ""
        cap = self.max_parallel(ranks)
        return f"Local sweep: {jobs} jobs, at most {cap} at once ({rule}), {threads} thread(s) per job{each}"

    def threads(self) -> int:
        """Threads per job: ``cpus_per_task`` (1 when unset)."""
        return max(1, int(self.params.get("cpus_per_task") or 1))

    def _executor(self) -> Any:
        """A submitit local executor with the launcher's parameters (as the plugin's ``launch`` builds it)."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        executor = submitit.AutoExecutor(cluster="local", folder=self.params["submitit_folder"])
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        skip = {"submitit_folder", "max_num_timeout"}
        executor.update_parameters(
            **{k if k in base else f"local_{k}": v for k, v in self.params.items() if k not in skip}
        )
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run the jobs as a pool. A job whose process dies (killed, timed out) is returned as FAILED and the others
        still run: Hydra re-raises the first failure only after the whole sweep, and each run's ``summary.json`` is
        the per-job record."""
        from pathlib import Path

        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        ranks = max(job_ranks(loader.load_sweep_config(self.config, list(o)).trainer) for o in job_overrides)
        cap = self.max_parallel(ranks)
        log.info(self.plan(len(job_overrides), ranks))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        executor = self._executor()

        def start(index: int, overrides: Sequence[str]) -> Any:
            num = initial_job_idx + index
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            state = Singleton.get_state()
            return executor.submit(self, list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", state)

        with _thread_env(self.threads()):
            jobs = run_pool(job_overrides, cap, start, lambda job: job.done())
        results: list[JobReturn] = []
        for overrides, job in zip(job_overrides, jobs):
            try:
                results.append(job.results()[0])
            except Exception as exc:  # the job's process died before Hydra could record its result
                log.error(f"job {job.job_id} ({' '.join(overrides)}): {exc}")
                results.append(_failed(overrides, exc))
        return results


def gpus_for(job_configs: Sequence[Any]) -> int:
    """GPUs per node that the jobs need: 1 when any job trains on images (its data set's ``kind``), 0 when all
    train on points (the 2-D mixtures and the 1-D demo run as fast on CPUs). The data set says it, not its name."""
    from hydra.utils import get_class

    kinds = {getattr(get_class(cfg.data._target_), "kind", "image") for cfg in job_configs}
    return 1 if "image" in kinds else 0


def thread_setup(cpus_per_task: Any, setup: Sequence[str] | None) -> list[str]:
    """The sbatch script's setup lines: the thread-count variables = ``cpus_per_task`` (1 when unset; the cores of
    each task, one task per rank), then the user's own ``setup`` lines (which may set them otherwise)."""
    threads = max(1, int(cpus_per_task or 1))
    return [f"export {key}={threads}" for key in _THREAD_VARS] + list(setup or [])


class RecipeSlurmLauncher(_OnceLogging, _SubmititSlurmLauncher):
    """The plugin's SLURM launcher; ``gpus_per_node: null`` asks for what the sweep's data sets need
    (:func:`gpus_for`, composed per job as Hydra will run it), and each task's thread count is its
    ``cpus_per_task`` (:func:`thread_setup`)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if self.params.get("gpus_per_node") is None:
            assert self.hydra_context is not None and self.config is not None
            loader = self.hydra_context.config_loader
            configs = [loader.load_sweep_config(self.config, list(o)) for o in job_overrides]
            self.params["gpus_per_node"] = gpus_for(configs) * int(self.params.get("tasks_per_node") or 1)  # DDP
            log.info(f"SLURM: {self.params['gpus_per_node']} GPU(s) per job (from the jobs' data sets)")
        # in the script, not only in this process's environment (which sbatch copies unless the cluster sets
        # --export=NONE); restored after, so a second launch of the same sweep does not add the lines again
        user_setup = self.params.get("setup")
        self.params["setup"] = thread_setup(self.params.get("cpus_per_task"), user_setup)
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            self.params["setup"] = user_setup


def _failed(overrides: Sequence[str], exc: BaseException) -> Any:
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=exc)
