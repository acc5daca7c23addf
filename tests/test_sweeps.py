"""Sweeps and the report that compares their arms: recipes and W&B sweeps name only options that exist, a sweep
through the capped submitit launcher completes, and the report's numbers are the runs' numbers; failed runs are
listed, never dropped."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import submitit
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from scipy import stats

from conftest import CONF, ROOT, comparison_arms, compose_cfg, run_cli

REPORT = ROOT / "src" / "report.py"
SWEEPS = ROOT / "sweeps"
RECIPES = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
WANDB_SWEEPS = sorted(SWEEPS.glob("*.yaml"))
TINY = [
    "data=ring8",
    "max_steps=3",
    "log_every=1",
    "sample_every=3",
    "ckpt_every=3",
    "batch_size=16",
    "logger=csv",
    "model.generator.width=16",
    "model.discriminator.width=16",
]


def hydra_node(overrides: list[str]) -> Any:
    """The ``hydra`` node of the composed config (compose_cfg drops it)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra


def run_report(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPORT), str(folder)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


# ----------------------------------------------------------------------------------------------- recipes


def test_the_named_recipes_exist() -> None:
    assert {"arms_ring8", "arms_grid25", "arms_digits", "smoke"} <= set(RECIPES)
    assert len(WANDB_SWEEPS) >= 2


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_sweep_recipe_composes_for_every_job(recipe: str) -> None:
    params = hydra_node([f"+sweep={recipe}"]).sweeper.params
    assert params, f"conf/sweep/{recipe}.yaml sets no hydra.sweeper.params"
    # expand exactly as Hydra's basic sweeper does, then compose each job's config
    parser = OverridesParser.create()
    jobs = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), None)[0]
    assert len(jobs) >= 2
    # one job per combination of everything but the seed (a plain integer: it cannot change what composes)
    distinct = {tuple(o for o in job if not o.startswith("seed=")): job for job in reversed(jobs)}
    for job in distinct.values():
        cfg = compose_cfg([f"+sweep={recipe}", *job])
        for override in job:
            key, value = override.split("=", 1)
            if key == "seed":
                assert cfg.seed == int(value)
            elif key not in ("data", "loss"):  # groups: composing at all is the check
                assert str(OmegaConf.select(cfg, key)) == value


def test_recipe_axes_match_the_issue() -> None:
    def jobs(recipe: str) -> list[list[str]]:
        params = hydra_node([f"+sweep={recipe}"]).sweeper.params
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        return BasicSweeper.split_arguments(parsed, None)[0]

    arms5 = set(comparison_arms())
    for recipe, data, arms, seeds in [
        ("arms_ring8", "ring8", arms5, 5),
        ("arms_grid25", "grid25", arms5, 5),
        ("arms_digits", "digits", arms5, 5),
        ("smoke", "ring8", {"minimax", "non_saturating"}, 2),
    ]:
        combos = [dict(o.split("=", 1) for o in job) for job in jobs(recipe)]
        assert {c["data"] for c in combos} == {data}, recipe
        assert {c["loss"] for c in combos} == arms, recipe
        assert {int(c["seed"]) for c in combos} == set(range(seeds)), recipe
        assert len(combos) == len(arms) * seeds, recipe


def _recipe_jobs(recipe: str) -> list[dict[str, str]]:
    """The jobs of a Hydra recipe as the basic sweeper expands them, each as {key: value}."""
    params = hydra_node([f"+sweep={recipe}"]).sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [dict(o.split("=", 1) for o in job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def _wandb_jobs(path: Path) -> list[dict[str, str]]:
    """The runs of a W&B grid sweep, each as {parameter: value}."""
    axes = {k: p.get("values", [p.get("value")]) for k, p in yaml.safe_load(path.read_text())["parameters"].items()}
    return [dict(zip(axes, map(str, combo))) for combo in itertools.product(*axes.values())]


def test_the_sweeps_readme_tables_give_each_sweeps_seeds_and_run_count() -> None:
    """sweeps/README.md's tables: every "seeds a–b" and "(N runs)" is what the recipe or W&B file runs."""
    import re

    rows = re.findall(r"^\| `([\w.]+)` \| (.*) \|$", (SWEEPS / "README.md").read_text(), flags=re.M)
    checked = 0
    for name, text in rows:
        jobs = _wandb_jobs(SWEEPS / name) if name.endswith(".yaml") else _recipe_jobs(name)
        if seeds := re.search(r"seeds (\d+)–(\d+)", text):
            first, last = map(int, seeds.groups())
            assert {int(j["seed"]) for j in jobs} == set(range(first, last + 1)), (name, text)
        if runs := re.search(r"\((\d+) runs\)", text):
            assert len(jobs) == int(runs.group(1)), (name, text)
        checked += bool(seeds) + bool(runs)
    assert {name for name, _ in rows} >= {"arms_digits", "wandb_arms_digits.yaml"} and checked >= 10


def test_launcher_configs_compose() -> None:
    slurm = hydra_node(["hydra/launcher=slurm"]).launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert slurm.max_num_timeout > 0 and slurm.signal_delay_s > 0  # requeued on timeout/preemption
    for key in ("partition", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism"):
        assert key in slurm
    local = hydra_node(["hydra/launcher=local"]).launcher
    assert local._target_ == "hydra_plugins.ganlab_launcher.CappedLocalLauncher"
    assert local.cpus_per_task >= 1


@pytest.mark.parametrize("path", WANDB_SWEEPS, ids=lambda p: p.name)
def test_every_wandb_sweep_names_only_options_that_exist(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "src/train.py" and (ROOT / spec["program"]).is_file()
    # the agent turns each parameter into key=value only with args_no_hyphens (${args} would pass --key=value)
    assert "${args_no_hyphens}" in spec["command"] and "${args}" not in spec["command"]
    assert spec["method"] in ("grid", "random", "bayes")
    axes: dict[str, list[Any]] = {}
    for name, param in spec["parameters"].items():
        if "values" in param:
            axes[name] = list(param["values"])
        elif "value" in param:
            axes[name] = [param["value"]]
        else:  # a distribution: its ends are the values to check
            axes[name] = [param["min"], param["max"]]
    # fixed arguments after the macros are overrides too (the agent passes them as they are)
    fixed = [c for c in spec["command"][spec["command"].index("${program}") + 1 :] if not c.startswith("${")]
    combos = list(itertools.product(*axes.values()))
    assert len(combos) >= 2
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "run456")
    for combo in combos:
        # what the W&B agent passes for ${args_no_hyphens}: f"{param}={value}"
        overrides = [f"{k}={v}" for k, v in zip(axes, combo)]
        cfg = compose_cfg([*overrides, *fixed])
        assert cfg.seed == dict(zip(axes, combo)).get("seed", cfg.seed)
    run_dir = str(hydra_node([*overrides, *fixed]).run.dir)
    # one folder per W&B sweep, one subfolder per run: what report.py reads
    assert run_dir.startswith("outputs/wandb_sweeps/sweep123/run456_"), run_dir


# ----------------------------------------------------------------------------------------------- sweeps + report


def test_local_launcher_sweep_completes_and_the_report_averages_its_runs(tmp_path: Path) -> None:
    proc = run_cli(
        ["hydra.mode=MULTIRUN", "hydra/launcher=local", "loss=minimax,non_saturating", "seed=0,1", *TINY], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "multirun"
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    assert "at most" in proc.stderr + proc.stdout  # the capped launcher ran, not submitit's uncapped one
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 4  # each job went through submitit
    for out in (sweep / ".submitit").glob("*/*_log.out"):  # each submitit line once, not again in Hydra's format
        text = out.read_text()
        assert text.count("Job completed successfully") == 1 and "[submitit]" not in text, text

    rep = run_report(sweep)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "| `minimax` | 2 | 0,1 |" in rep.stdout and "| `non_saturating` | 2 | 0,1 |" in rep.stdout
    report = json.loads((sweep / "report.json").read_text())
    rows = {row["arm"]: row for row in report["datasets"]["ring8"]["arms"]}
    assert set(rows) == {"minimax", "non_saturating"}
    for arm, row in rows.items():
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        mine = [s["final"] for s in summaries if s["choices"]["loss"] == arm]
        for metric in ("loss/d", "loss/g", "D(x)", "D(G(z))"):
            values = [f[metric] for f in mine]
            stat = row["metrics"][metric]
            assert stat["mean"] == pytest.approx(sum(values) / 2, rel=1e-12)
            half = stats.t.ppf(0.975, 1) * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)
            assert stat["ci95"] == pytest.approx(half, rel=1e-9)
    assert report["failed"] == []
    md = (sweep / "report.md").read_text()
    assert "## ring8" in md and "## Failed or diverged runs" in md
    assert (sweep / "plots" / "ring8" / "loss_d.png").stat().st_size > 0
    assert (sweep / "plots" / "ring8" / "samples.png").stat().st_size > 0


def test_a_sweep_with_a_failing_job_goes_on_and_the_report_lists_it(tmp_path: Path) -> None:
    # the smoke recipe drives the basic sweeper (arms x seeds from hydra.sweeper.params); max_loss=1e-3 makes every
    # loss count as an explosion, so the second and fourth job diverge
    proc = run_cli(["hydra.mode=MULTIRUN", "+sweep=smoke", "seed=0", "max_loss=1e6,1e-3", *TINY], tmp_path)
    assert proc.returncode == 1  # Hydra re-raises the first failure, after every job ran
    sweep = tmp_path / "multirun"
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json")}
    assert sorted(statuses.values()) == ["completed", "completed", "diverged", "diverged"], statuses

    rep = run_report(sweep)
    assert rep.returncode == 0, rep.stderr[-3000:]
    report = json.loads((sweep / "report.json").read_text())
    failed = report["failed"]
    assert len(failed) == 2 and all("beyond max_loss" in f["error"] for f in failed)
    assert {f["arm"] for f in failed} == {"minimax max_loss=0.001", "non_saturating max_loss=0.001"}
    rows = {row["arm"]: row for row in report["datasets"]["ring8"]["arms"]}
    assert rows["minimax max_loss=1000000.0"]["n"] == 1
    assert rows["minimax max_loss=0.001"]["n"] == 0 and rows["minimax max_loss=0.001"]["failed"] == 1
    md = (sweep / "report.md").read_text()
    section = md.split("## Failed or diverged runs", 1)[1]
    assert section.count("beyond max_loss") >= 2  # listed with the runs (and with the sweep's jobs)
    assert "failed or diverged" in rep.stdout


def _fake_run(folder: Path, loss: str, seed: int, status: str = "completed", **final: float) -> None:
    folder.mkdir(parents=True)
    summary = {
        "status": status,
        "seed": seed,
        "choices": {"data": "grid25", "loss": loss},
        "overrides": [f"loss={loss}", f"seed={seed}", "data=grid25"],
        "final": final,
    }
    if status == "failed":
        summary["error"] = "RuntimeError: boom"
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_keeps_one_seed_rows_and_lists_diverged_unfinished_and_silent_runs(tmp_path: Path) -> None:
    from ganlab.report import write_report

    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", "minimax", 0, modes2500=20.0)
    _fake_run(sweep / "1", "minimax", 1, modes2500=22.0)
    _fake_run(sweep / "2", "minimax", 2, modes2500=float("nan"))  # diverged
    _fake_run(sweep / "3", "non_saturating", 0, modes2500=25.0)
    _fake_run(sweep / "4", "non_saturating", 1, status="running")  # killed mid-run
    (sweep / "5" / ".hydra").mkdir(parents=True)  # a job that died before writing summary.json
    (sweep / "5" / ".hydra" / "overrides.yaml").write_text("- loss=non_saturating\n- seed=2\n- data=grid25\n")

    report = write_report(sweep, plots=False)
    rows = {row["arm"]: row for row in report["datasets"]["grid25"]["arms"]}
    assert rows["minimax"]["n"] == 2 and rows["minimax"]["metrics"]["modes2500"]["mean"] == pytest.approx(21.0)
    assert rows["minimax"]["metrics"]["modes2500"]["ci95"] == pytest.approx(
        stats.t.ppf(0.975, 1) * math.sqrt(2) / 2**0.5
    )
    assert rows["non_saturating"]["n"] == 1 and rows["non_saturating"]["metrics"]["modes2500"]["ci95"] is None
    problems = {f["run"]: f["problem"] for f in report["failed"]}
    assert set(problems) == {"2", "4", "5"}
    assert problems["2"].startswith("diverged") and "running" in problems["4"] and "no summary.json" in problems["5"]
    md = (sweep / "report.md").read_text()
    assert "| `non_saturating` | 1 | 0 | 2 | 25 |" in md  # one seed: a mean, no ±
    # strict JSON: a NaN or infinity is written as null
    json.loads((sweep / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))


@pytest.mark.parametrize("folder", ["does/not/exist", "conf"])
def test_report_on_a_folder_without_runs_exits_2_with_one_line(folder: str) -> None:
    proc = run_report(ROOT / folder)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("recipe", "gpus"), [("arms_ring8", 0), ("arms_digits", 1), ("arms_grid25", 0)])
def test_the_slurm_launcher_settings_render_an_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str, gpus: int
) -> None:
    from hydra_plugins.ganlab_launcher import gpus_for

    # no SLURM here: a stand-in srun satisfies submitit's check, then the settings take the launcher's own path
    # (hydra_submitit_launcher: base keys as they are, the others prefixed slurm_) into an sbatch script
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"+sweep={recipe}"]
    hydra = hydra_node(overrides)
    launcher = hydra.launcher
    assert launcher._target_ == "hydra_plugins.ganlab_launcher.RecipeSlurmLauncher"
    assert launcher.name == recipe  # the job name is the recipe's
    assert launcher.gpus_per_node is None  # resolved per sweep from its jobs' data sets, as the launcher does:
    params = OmegaConf.to_container(launcher, resolve=False)
    for key in ("_target_", "submitit_folder", "name"):
        params.pop(key)
    data = str(hydra.sweeper.params.data)
    params["gpus_per_node"] = gpus_for([compose_cfg([f"data={data}", f"+sweep={recipe}"])])
    assert params["gpus_per_node"] == gpus
    executor = submitit.AutoExecutor(
        folder=tmp_path / "jobs", cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    executor.update_parameters(name=str(launcher.name))
    script = executor._executor._make_submission_file_text("python src/train.py", "uid")
    assert "#SBATCH --partition=gpu" in script and f"#SBATCH --job-name={recipe}" in script
    assert ("#SBATCH --gpus-per-node=1" in script) == (gpus == 1), script
    assert f"@{launcher.signal_delay_s}" in script  # the warning signal that triggers the requeue
    assert executor._executor.max_num_timeout == launcher.max_num_timeout > 0


# ----------------------------------------------------------------------------------------------- the local pool


def test_the_local_launcher_is_a_pool_capped_at_its_slots() -> None:
    """Through the launcher's own scheduling function, with jobs that only sleep: never more than ``cap`` at
    once, and a short job of the "second wave" starts while the long job of the first is still running."""
    import threading
    import time

    from hydra_plugins.ganlab_launcher import run_pool

    lengths = [0.8, 0.1, 0.1, 0.1, 0.1]
    lock = threading.Lock()
    running, peak = [0], [0]
    started: dict[int, float] = {}
    ended: dict[int, float] = {}

    def job(index: int, seconds: float) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started[index] = time.perf_counter()
        time.sleep(seconds)
        with lock:
            running[0] -= 1
            ended[index] = time.perf_counter()

    def start(index: int, seconds: float) -> threading.Thread:
        thread = threading.Thread(target=job, args=(index, seconds))
        thread.start()
        return thread

    t0 = time.perf_counter()
    handles = run_pool(lengths, 2, start, lambda t: not t.is_alive(), poll_s=0.01)
    wall = time.perf_counter() - t0
    assert len(handles) == 5 and not any(t.is_alive() for t in handles)
    assert peak[0] == 2  # the cap, and every slot used
    assert started[2] < ended[0] and started[4] < ended[0]  # short jobs did not wait for the long one
    assert wall < 0.8 + 0.1 + 0.3  # waves would take 0.8 + 0.1 + 0.1 and leave a slot idle for 0.7 s


def test_the_slurm_gpu_request_follows_the_data_sets_kind() -> None:
    from hydra_plugins.ganlab_launcher import gpus_for

    assert gpus_for([compose_cfg(["data=ring8"]), compose_cfg(["data=gauss1d"])]) == 0
    assert gpus_for([compose_cfg(["data=ring8"]), compose_cfg(["data=digits"])]) == 1


def test_the_grid_recipe_runs_the_goal_budget_and_the_command_line_wins() -> None:
    assert compose_cfg(["+sweep=arms_grid25", "data=grid25"]).max_steps == 10000
    assert compose_cfg(["+sweep=arms_grid25", "data=grid25", "max_steps=300"]).max_steps == 300
