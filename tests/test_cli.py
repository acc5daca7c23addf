"""The entry point from the command line: every arm on 2-D and image data writes its run folder; the default logger
writes offline W&B files. (Bad input on the command line: test_bad_input.py; a missing data set: test_data.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONF, compose_cfg, run_cli
from ganlab.pipeline import train

ARMS = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
FAST = ["max_steps=3", "log_every=1", "sample_every=3", "ckpt_every=3", "batch_size=16"]


@pytest.fixture(scope="module")
def every_arm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every arm on 2-D points and on images through the real command line, as one sweep (one process start for
    all of them; the final evaluations at 200 samples, their protocols are test_evaluation.py's)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    args = ["hydra.mode=MULTIRUN", f"loss={','.join(ARMS)}", "data=ring8,digits", "logger=csv", *FAST,
            "metrics.n_samples=200"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "multirun"


@pytest.mark.parametrize("data", ["ring8", "digits"])
def test_every_arm_trains_and_writes_its_run_folder(every_arm: Path, data: str) -> None:
    for loss in ARMS:
        (run,) = every_arm.glob(f"*_{data}_{loss}_seed0")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["g_steps"] == 3 and summary["choices"]["loss"] == loss and summary["choices"]["data"] == data
        assert f"loss={loss}" in summary["overrides"] and summary["seed"] == 0
        assert set(summary["final"]) >= {"loss/d", "loss/g", "D(x)", "D(G(z))", "grad_norm/d", "grad_norm/g"}
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "samples" / "step_0000003.png").is_file()
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"loss/d", "loss/g", "step/g", "step/d"} <= set(header)
        if loss == "minibatch_discrimination":  # the arm switches the D layer on
            assert "minibatch_discrimination" in (run / "config.yaml").read_text()


def test_default_logger_writes_offline_wandb_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the default logger as a user without W&B credentials has it (in this process: the CLI is tested above)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary = train(compose_cfg(["data=ring8", *FAST]), tmp_path / "run")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert summary["wandb_id"] in runs[0].name
    start = capsys.readouterr().out.splitlines()[0]  # said once, in the run's start line, with the sync hint
    assert "W&B offline (no credentials" in start and "wandb sync" in start
