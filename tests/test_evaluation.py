"""Evaluation inside a run: the right metrics for each data set, at every eval_every and at the end, in the
CSV and in summary.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import compose_cfg, run_cli
from ganlab.pipeline import train

BUDGET = ["logger=csv", "max_steps=4", "log_every=2", "sample_every=4", "ckpt_every=4", "batch_size=16"]
FAST = [*BUDGET, "metrics.eval_every=2"]


def _summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def _train(overrides: list[str], tmp_path: Path) -> None:
    """The run ``python src/train.py <overrides>`` makes, in this process (test_cli.py covers the command line)."""
    assert train(compose_cfg(overrides), tmp_path / "run")["status"] == "completed"


def test_digits_run_logs_fidelity_metrics_at_every_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANLAB_CACHE", str(tmp_path))
    _train(["data=digits", "metrics.n_samples=500", *FAST], tmp_path)
    final = _summary(tmp_path)["final"]
    for key in ("fid500", "is500", "kid500", "precision500", "recall500"):
        assert key in final and final[key] == final[key]  # present and not NaN
    assert final["fid500"] > 0
    assert {"eval/D(x_test)", "eval/D(G(z))", "eval/d_accuracy"} <= set(final)
    assert 0.0 <= final["eval/d_accuracy"] <= 1.0
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fid500")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # eval_every=2 over 4 generator steps


def test_ring8_run_logs_mode_coverage(tmp_path: Path) -> None:
    _train(["data=ring8", *FAST], tmp_path)
    summary = _summary(tmp_path)
    final = summary["final"]
    assert {"modes2500", "hq_fraction2500", "reverse_kl2500"} <= set(final)  # PacGAN's 2,500-sample protocol
    assert 0 <= final["modes2500"] <= 8 and 0.0 <= final["hq_fraction2500"] <= 1.0
    assert summary["data"] == {
        "name": "ring8",
        "preview": "scatter",
        "features": None,
        "modes": "MixtureModes(radius_stds=3.0)",
        "eval_samples": 2500,
    }


def test_metrics_none_skips_evaluation(tmp_path: Path) -> None:
    _train(["data=ring8", "metrics=none", *BUDGET], tmp_path)
    summary = _summary(tmp_path)
    assert not [k for k in summary["final"] if k.startswith(("modes", "eval/"))]
    assert summary["eval_time_s"] == 0


def test_missing_inception_weights_file_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(["data=digits", "metrics.inception_weights=/nowhere/inception.pth", *FAST], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "error: metrics.inception_weights: no file at /nowhere/inception.pth"
    assert "Traceback" not in proc.stderr


def test_deterministic_mode_changes_no_number_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deterministic_mode_restored: None
) -> None:
    # trainer.deterministic=true (what a GPU run needs to repeat: torch.use_deterministic_algorithms) runs the whole
    # step and the stacked evaluation (bincount, topk, the pruned k-NN search) without an op that refuses it, and
    # on the CPU, deterministic already, gives the same bits
    import torch

    monkeypatch.setenv("GANLAB_CACHE", str(tmp_path))
    finals = {}
    for flag in ("false", "true"):
        _train(
            ["data=stacked_digits", "metrics.n_samples=300", f"trainer.deterministic={flag}", *FAST],
            tmp_path / flag,
        )
        finals[flag] = json.loads((tmp_path / flag / "run" / "summary.json").read_text())["final"]
        assert torch.are_deterministic_algorithms_enabled() is (flag == "true")  # Lightning set the flag
    assert "fid300" in finals["true"] and "stacked_modes300" in finals["true"]
    assert finals["true"] == finals["false"]
