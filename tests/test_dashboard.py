"""What a researcher reviews: the W&B record groups by arm, data set and seed (read back from the offline run
files), every chart's x-axis is the generator step, and a healthy run's console is a start line, the progress
lines and one line of final metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TRAIN, wandb_records

RUN = ["data=ring8", "loss=minimax", "seed=3", "max_steps=20", "log_every=5", "sample_every=20", "ckpt_every=20",
       "batch_size=16", "model.generator.width=16", "model.discriminator.width=16", "logger=wandb"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real command-line run, as a user has it (W&B settings unset), that every test here reads."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_SILENT")}
    env["WANDB_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(TRAIN), f"hydra.run.dir={tmp_path / 'run'}", *RUN],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    return tmp_path, proc


def test_the_wandb_record_groups_by_arm_dataset_and_seed_and_steps_are_generator_steps(
    cli_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    tmp_path, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: {"value": json.loads(item.value_json)} for item in run.config.update}
    # the keys the README tells you to group by, flat, with the values of this run
    assert config["arm"]["value"] == "minimax" and config["dataset"]["value"] == "ring8"
    assert config["seed"]["value"] == 3 and config["loss"]["value"] == "minimax" and config["data"]["value"] == "ring8"
    assert config["config"]["value"]["loss"]["_target_"] == "ganlab.losses.Minimax"  # nested settings survive
    assert config["params/g"]["value"] == summary["params/g"] > 0 and config["params/d"]["value"] > 0
    # batch_size and d_steps as the run resolved them (the config may leave them null to the data set)
    assert config["config"]["value"]["batch_size"] == summary["batch_size"] == 16
    assert config["config"]["value"]["d_steps"] == summary["d_steps"] == 1
    assert run.display_name == "ring8/minimax/s3"
    steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    assert steps == [5, 10, 15, 20]  # W&B's step is the generator step: training scalars, samples, evaluation
    logged = [
        {i.key or "/".join(i.nested_key) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert all("step/g" in keys for keys in logged) and "modes2500" in logged[-1]


def test_a_healthy_runs_console_is_a_start_line_progress_and_a_final_line(
    cli_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    _, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # no warnings, no W&B banner or summary block, no font-cache note
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("training 20 generator steps on cpu in ") and "logging to metrics.csv + W&B" in lines[0]
    progress = lines[1:-1]
    assert 1 <= len(progress) <= 21 and all(line.startswith("[G step ") for line in progress)
    assert lines[-1].startswith("final: ") and "modes2500" in lines[-1]
    assert len(lines) <= 23


def test_progress_lines_have_no_empty_fields(cli_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, proc = cli_run
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[G step")]
    assert progress
    for line in progress:
        assert "]  |" not in line and "  " not in line, line
