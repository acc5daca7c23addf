"""The report separates results from diagnostics and marks better directions, orders arms as the sweep ran them,
compares arms with a baseline seed by seed, and lists the sweep's jobs that have no completed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from scipy import stats

from ganlab import report as rep
from ganlab.report import direction, is_result, main, write_report


def _run(
    folder: Path, loss: str, seed: int, job: int | None, status: str = "completed", params_d: int = 1000, **final: float
) -> None:
    folder.mkdir(parents=True)
    summary = {
        "status": status,
        "seed": seed,
        "job_num": job,
        "choices": {"data": "ring8", "loss": loss},
        "overrides": [f"loss={loss}", f"seed={seed}"],
        "final": final,
        "params/g": 500,
        "params/d": params_d,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_an_arm_is_what_its_runs_trained_with_not_how_often_they_recorded(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cadence = ["log_every=500", "sample_every=9", "ckpt_every=9", "logger=csv"]
    # seed, config.yaml (None: an old run without one), resolved batch size, command-line overrides
    runs = [
        (0, {"batch_size": None, "max_steps": 10000, "log_every": 50}, 512, []),  # null resolved to 512, recipe body
        (
            1,
            {"batch_size": 512, "max_steps": 10000, "log_every": 500},
            512,
            ["batch_size=512", "max_steps=10000", *cadence],
        ),
        (2, {"batch_size": None, "max_steps": 10000, "log_every": 50}, 256, []),  # trained at 256: another arm
        (3, {"batch_size": None, "max_steps": 5000, "log_every": 50}, 512, ["max_steps=5000"]),  # another budget
        (4, None, None, []),  # an old record: nothing known beyond its overrides
    ]
    for seed, config, batch, extra in runs:
        _run(sweep / f"{seed}", "minimax", seed, seed, modes2500=8.0)
        path = sweep / f"{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["overrides"] += extra
        if config is not None:
            summary.update(batch_size=batch, d_steps=1)
            OmegaConf.save(OmegaConf.create({**config, "d_steps": None}), sweep / f"{seed}" / "config.yaml")
        path.write_text(json.dumps(summary))
    arms = rep.group_runs(rep.find_runs(sweep))["ring8"]
    assert {arm: [r.seed for r in runs] for arm, runs in arms.items()} == {
        "minimax batch_size=512 max_steps=10000": [0, 1],
        "minimax batch_size=256 max_steps=10000": [2],
        "minimax batch_size=512 max_steps=5000": [3],
        "minimax": [4],
    }


def test_directions_and_the_split_between_results_and_diagnostics() -> None:
    assert [direction(m) for m in ("fid2k", "kid2k", "is2k", "precision2k", "recall2k")] == ["↓", "↓", "↑", "↑", "↑"]
    assert [direction(m) for m in ("modes2500", "hq_fraction2500", "reverse_kl2500")] == ["↑", "↑", "↓"]
    assert [direction(m) for m in ("stacked_modes26k", "stacked_kl26k", "ssl/test_error")] == ["↑", "↓", "↓"]
    assert direction("D(x)") == direction("eval/D(G(z))") == direction("eval/d_accuracy") == "→½"
    assert all(is_result(m) for m in ("fid2k", "modes2500", "ssl/test_error"))
    assert not any(is_result(m) for m in ("eval/d_accuracy", "D(x)", "loss/d", "grad_norm/g", "is2k_std"))
    order = rep._metric_order(["lr/g", "eval/seconds", "loss/d", "modes2500", "eval/d_accuracy", "step/g"])
    assert order == ["modes2500", "eval/d_accuracy", "loss/d"]  # no learning rate, timing or counter


def test_paired_differences_arm_order_and_pending_jobs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    # the sweep ran minibatch_discrimination first: job numbers, not a list in the report, give the order
    modes = {"minibatch_discrimination": [7.0, 8.0, 6.5], "non_saturating": [6.0, 6.0, 5.0], "minimax": [6.5, 6.0]}
    for arm, loss in enumerate(("minibatch_discrimination", "non_saturating", "minimax")):
        for seed, value in enumerate(modes[loss]):
            job = 4 * arm + seed  # Hydra's numbering: the first axis varies slowest
            d = 1234 + (seed == 2) if loss == "minibatch_discrimination" else 1000  # MD: a bigger D (one run bigger)
            _run(
                sweep / f"{job}_{loss}_{seed}",
                loss,
                seed,
                job,
                params_d=d,
                modes2500=value,
                **{"lr/g": 0.0, "loss/d": 1.0},
            )
    _run(sweep / "10_minimax_2", "minimax", 2, 10, status="failed", modes2500=1.0)
    # Hydra's record: 3 arms x 4 seeds = 12 jobs; seed 3 (jobs 3, 7, 11) never started
    record = {
        "hydra": {
            "sweeper": {"params": {"loss": "minibatch_discrimination,non_saturating,minimax"}},
            "overrides": {"task": ["data=ring8", "seed=0,1,2,3"]},
        }
    }
    OmegaConf.save(OmegaConf.create(record), sweep / "multirun.yaml")
    assert main([str(sweep), "--no-plots"]) == 0
    out = capsys.readouterr().out
    report = json.loads((sweep / "report.json").read_text())
    ds = report["datasets"]["ring8"]
    assert [row["arm"] for row in ds["arms"]] == ["minibatch_discrimination", "non_saturating", "minimax"]
    assert ds["results"] == ["modes2500"] and ds["diagnostics"] == ["loss/d"]
    assert "lr/g" not in ds["metrics"] and "lr/g" not in out
    assert "modes2500 ↑" in out and "Diagnostics:" in out
    # each arm's parameter counts beside its results (a range where its runs differ), not among the diagnostics
    assert "| arm | n | seeds | failed | G params | D params | modes2500 ↑ |" in out
    assert "| 500 | 1,234–1,235 |" in out and "| 500 | 1,000 |" in out
    assert out.count("D params") == 1 and ds["arms"][0]["params"] == {"g": [500], "d": [1234, 1235]}

    pairs = {row["arm"]: row for row in ds["paired"]["rows"]}
    assert ds["paired"]["baseline"] == "non_saturating" and set(pairs) == {"minibatch_discrimination", "minimax"}
    md = pairs["minibatch_discrimination"]["metrics"]["modes2500"]
    diffs = [1.0, 2.0, 1.5]
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / 3**0.5
    assert md["mean"] == pytest.approx(1.5) and md["ci95"] == pytest.approx(half) and md["values"] == diffs
    assert half < 1.5 and md["excludes_zero"]  # marked
    assert "**+1.5 ± " in (sweep / "report.md").read_text()
    mm = pairs["minimax"]["metrics"]["modes2500"]  # only the seeds both completed: 0 and 1
    assert pairs["minimax"]["seeds"] == [0, 1] and mm["values"] == [0.5, 0.0] and not mm["excludes_zero"]

    jobs = {j["job"]: j for j in report["jobs"]}
    assert {n for n, j in jobs.items() if j["state"] == "pending"} == {3, 7, 11}
    # a job whose folder exists but holds no run stopped before training (a refused config): failed, not pending
    (sweep / "3_ring8_minibatch_discrimination_seed3").mkdir()
    again_jobs = {j["job"]: j for j in write_report(sweep, plots=False)["jobs"]}
    assert again_jobs[3]["state"] == "failed" and "no summary.json" in again_jobs[3]["reason"]
    assert again_jobs[3]["run"] == "3_ring8_minibatch_discrimination_seed3" and again_jobs[7]["state"] == "pending"
    (sweep / "3_ring8_minibatch_discrimination_seed3").rmdir()
    assert jobs[10]["state"] == "failed" and "seed=2" in jobs[10]["overrides"] and set(jobs) == {3, 7, 10, 11}
    assert "pending" in (sweep / "report.md").read_text()

    # another baseline, by flag
    again = write_report(sweep, plots=False, baseline="minimax")
    assert {row["arm"] for row in again["datasets"]["ring8"]["paired"]["rows"]} == {
        "minibatch_discrimination",
        "non_saturating",
    }


def test_a_sweep_with_only_pending_jobs_still_reports_them(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    record = {"hydra": {"sweeper": {"params": None}, "overrides": {"task": ["loss=minimax,non_saturating"]}}}
    OmegaConf.save(OmegaConf.create(record), sweep / "multirun.yaml")
    report = write_report(sweep, plots=False)
    assert [j["state"] for j in report["jobs"]] == ["pending", "pending"]


def test_only_evaluations_of_the_final_checkpoint_join_a_runs_results(tmp_path: Path) -> None:
    # evaluated at step 30, then extended to 60: the step-30 numbers are not the run's result
    run = tmp_path / "run"
    _run(run, "minimax", 0, None, modes2500=1.0)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "g_steps": 60}))
    (run / "evals").mkdir()
    (run / "evals" / "n_samples5000.json").write_text(json.dumps({"g_step": 30, "metrics": {"modes5k": 2.0}}))
    (run / "evals" / "n_samples500.json").write_text(json.dumps({"g_step": 60, "metrics": {"modes500": 3.0}}))
    assert rep.load_run(run / "summary.json").metrics == {"modes2500": 1.0, "modes500": 3.0}
