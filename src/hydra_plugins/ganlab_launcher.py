"""A submitit local launcher with a cap on the jobs that run at once (``conf/hydra/launcher/local.yaml``).

Hydra instantiates launchers only from the ``hydra_plugins`` namespace package, hence this module's place.

The plugin's ``submitit_local`` starts every job of a sweep at once; on two cores twenty GAN runs then thrash. This
launcher runs the sweep in waves of at most ``usable cores // cpus_per_task`` jobs and gives each job
``cpus_per_task`` threads, so jobs x threads matches the machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocalLauncher

log = logging.getLogger(__name__)

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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


class CappedLocalLauncher(_SubmititLocalLauncher):
    """``submitit_local`` in waves of at most ``usable_cores() // cpus_per_task`` parallel jobs."""

    def max_parallel(self) -> int:
        """How many jobs run at once: the usable cores divided by the threads each job gets."""
        return max(1, usable_cores() // self.threads())

    def threads(self) -> int:
        """Threads per job: ``cpus_per_task`` (1 when unset)."""
        return max(1, int(self.params.get("cpus_per_task") or 1))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run the jobs wave by wave. A job whose process dies (killed, timed out) is returned as FAILED and the
        remaining waves still run: Hydra re-raises the first failure only after the whole sweep, and each run's
        ``summary.json`` is the per-job record."""
        # Waves rather than a pool: the plugin's launch() stays the only code that talks to submitit; a slow arm
        # idles the other slots of its wave, which costs little when the arms of a sweep have similar budgets.
        cap = self.max_parallel()
        log.info(f"Local sweep: {len(job_overrides)} jobs, at most {cap} at once, {self.threads()} thread(s) each")
        results: list[JobReturn] = []
        with _thread_env(self.threads()):
            for start in range(0, len(job_overrides), cap):
                wave = job_overrides[start : start + cap]
                try:
                    results.extend(super().launch(wave, initial_job_idx + start))
                except Exception as exc:  # a job process died before Hydra could record its result
                    log.error(f"jobs {initial_job_idx + start}..{initial_job_idx + start + len(wave) - 1}: {exc}")
                    results.extend(_failed(o, exc) for o in wave)
        return results


def _failed(overrides: Sequence[str], exc: BaseException) -> Any:
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=exc)
