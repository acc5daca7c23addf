"""The sweep launchers give each job its cores: the local pool counts a DDP job's ranks, and the SLURM script sets
each task's thread count, so a sweep's threads add up to the cores it was given."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.types import HydraContext, RunMode
from hydra.utils import instantiate

import hydra_plugins.ganlab_launcher as plugin
from conftest import CONF, compose_cfg

POINTS = ["data=ring8", "trainer.accelerator=cpu", "logger=csv", "metrics=none"]


def _launcher(overrides: list[str], tmp_path: Path) -> Any:
    """The launcher Hydra would instantiate for ``-m <overrides>``, set up with a config loader as in a sweep."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    config = loader.load_configuration(
        "config", overrides=[*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], run_mode=RunMode.MULTIRUN
    )
    launcher = instantiate(config.hydra.launcher)
    launcher.setup(
        hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks()),
        task_function=lambda cfg: None,
        config=config,
    )
    return launcher


# ----------------------------------------------------------------------------------------------- the local pool


@pytest.mark.parametrize(
    ("cores", "cpus", "ranks", "cap"),
    [(2, 1, 1, 2), (2, 2, 1, 1), (2, 1, 2, 1), (2, 2, 2, 1), (4, 1, 2, 2), (4, 2, 2, 2), (4, 3, 2, 1), (8, 2, 4, 2)],
)
def test_the_local_pool_gives_a_ddp_job_a_core_per_rank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cores: int, cpus: int, ranks: int, cap: int
) -> None:
    monkeypatch.setattr(plugin, "usable_cores", lambda: cores)
    launcher = plugin.CappedLocalLauncher(cpus_per_task=cpus, submitit_folder=str(tmp_path))
    assert launcher.max_parallel(ranks) == cap == max(1, cores // max(cpus, ranks))
    line = launcher.plan(5, ranks)
    assert f"at most {cap} at once" in line and f"{cpus} thread(s) per job" in line
    assert (f"{max(1, cpus // ranks)} each" in line) == (ranks > 1)  # what each rank takes (ganlab.threads)


def test_a_job_s_ranks_are_its_trainer_devices() -> None:
    assert plugin.job_ranks(compose_cfg(POINTS).trainer) == 1
    assert plugin.job_ranks(compose_cfg([*POINTS, "trainer.devices=2"]).trainer) == 2
    assert plugin.job_ranks(compose_cfg([*POINTS, "trainer.devices=auto"]).trainer) == 1  # one CPU process
    # a value the run cannot read: that job fails in its own one line, the sweep is not stopped before it starts
    assert plugin.job_ranks(compose_cfg([*POINTS, "trainer.devices=two"]).trainer) == 1


@pytest.mark.parametrize(("devices", "cap", "each"), [("1", 2, None), ("2", 1, 1), ("1,2", 1, 1)])
def test_a_local_ddp_sweep_runs_as_many_jobs_as_its_ranks_leave_cores(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    devices: str,
    cap: int,
    each: int | None,
) -> None:
    """The audit's sweep (cpus_per_task=1 and trainer.devices=2 on 2 cores) through the launcher's own launch, with
    the pool stood in for: 1 job at a time (its 2 ranks, 1 thread each), not 2 jobs x 2 ranks on 2 cores; without
    DDP 2 jobs; a sweep over devices=1,2 is sized by its largest job."""
    monkeypatch.setattr(plugin, "usable_cores", lambda: 2)
    seen: dict[str, Any] = {}

    def pool(items: Any, cap: int, start: Any, done: Any, **kwargs: Any) -> list[Any]:
        seen.update(cap=cap, jobs=len(items), omp=os.environ.get("OMP_NUM_THREADS"))
        return []

    monkeypatch.setattr(plugin, "run_pool", pool)
    launcher = _launcher(["hydra/launcher=local", "hydra.launcher.cpus_per_task=1", *POINTS], tmp_path)
    jobs = [[*POINTS, f"trainer.devices={d}", f"seed={s}"] for d in devices.split(",") for s in (0, 1)]
    with caplog.at_level(logging.INFO, logger=plugin.__name__):
        launcher.launch(jobs, 0)
    assert seen == {"cap": cap, "jobs": len(jobs), "omp": "1"}  # the job's cores; its ranks split them
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Local sweep"))
    assert f"at most {cap} at once" in line and "max(cpus_per_task 1, trainer.devices" in line, line
    assert (each is not None) == (f"{each} each" in line), line


# ----------------------------------------------------------------------------------------------- SLURM


@pytest.mark.parametrize(("cpus", "setup"), [(4, None), (3, ["module load cuda"])])
def test_the_slurm_script_gives_each_task_its_cpus_as_threads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpus: int, setup: list[str] | None
) -> None:
    """Through the launcher's own launch with a stand-in sbatch that keeps the script it is given: the thread
    variables are exported before srun starts the tasks, the user's setup lines still follow, and a second launch
    of the same launcher does not add them twice."""
    import submitit.slurm.slurm as submitit_slurm

    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    fakes = {
        "sbatch": f'n=$(ls {scripts} | wc -l); cp "${{@: -1}}" {scripts}/job$n.sh; echo "Submitted batch job 4242$n"',
        "srun": "exit 0",
        "sacct": "exit 0",
        "scancel": "exit 0",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)  # the script must say it, not this process's environment
    monkeypatch.setattr(submitit_slurm.SlurmJob, "results", lambda self: [None])  # no job will ever run
    overrides = ["hydra/launcher=slurm", f"hydra.launcher.cpus_per_task={cpus}", "hydra.launcher.gpus_per_node=0"]
    if setup:
        overrides.append(f"hydra.launcher.setup=[{','.join(repr(s) for s in setup)}]")
    launcher = _launcher([*overrides, *POINTS], tmp_path)
    for _ in range(2):
        launcher.launch([[*POINTS, "seed=0"], [*POINTS, "seed=1"]], 0)
    texts = [p.read_text() for p in sorted(scripts.glob("job*.sh"))]
    assert len(texts) == 2  # one array per launch
    for text in texts:
        lines = text.splitlines()
        srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            assert lines.count(f"export {var}={cpus}") == 1 and lines.index(f"export {var}={cpus}") < srun, text
        for line in setup or []:
            assert lines.index(line) > lines.index(f"export OMP_NUM_THREADS={cpus}"), text  # the user's come last
    assert launcher.params["setup"] == setup  # the launcher's settings as given
