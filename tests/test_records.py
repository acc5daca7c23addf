"""A run's record survives every interruption, every re-run and every fault: a finished run re-run changes no
file, a killed run resumed in place ends with the weights *and* the metric history of an uninterrupted one,
SIGTERM/SIGUSR2 write the checkpoint of the step they arrive at, divergence leaves a finite checkpoint, a full
disk leaves no temporary file."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, TRAIN, assert_same_training_state, compose_cfg, wandb_records
from ganlab.errors import Diverged, Interrupted, UserError
from ganlab.pipeline import train
from ganlab.tricks.base import Trick

RING = [*TINY, "model.lr_decay=none"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _csv_rows(path: Path, drop: tuple[str, ...] = ("eval/seconds",)) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


# -- re-running and extending ---------------------------------------------------------------------------------------


def test_rerunning_a_finished_run_changes_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = [*RING, "max_steps=6", "ckpt_every=3", "log_every=2"]
    train(compose_cfg(args), run)
    before = _files(run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    summary = train(compose_cfg([*args, "resume=auto"]), run)  # what a requeued cluster job passes
    assert summary["status"] == "completed" and summary["final"]  # the record is returned, not emptied
    assert capsys.readouterr().out.startswith("run already complete (6 generator steps)")  # one line, no error
    assert _files(run) == before
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == mtimes
    with pytest.raises(UserError, match="already holds a run"):  # a fresh run over a finished one is refused
        train(compose_cfg(args), run)
    assert _files(run) == before


def test_extending_a_finished_run_continues_its_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [*RING, "ckpt_every=3", "log_every=1"]
    full = train(compose_cfg([*common, "max_steps=6"]), tmp_path / "full")
    train(compose_cfg([*common, "max_steps=3"]), run)
    extended = train(compose_cfg([*common, "max_steps=6", "resume=auto"]), run)
    assert extended["status"] == "completed" and extended["g_steps"] == 6
    assert extended["attempts"][0]["from_step"] == 3
    rows = _csv_rows(run / "metrics.csv")
    training = [r for r in rows if r["loss/d"]]
    assert [r["step"] for r in training] == [str(s) for s in range(1, 7)]  # every step once, none lost
    assert training == [r for r in _csv_rows(tmp_path / "full" / "metrics.csv") if r["loss/d"]]
    evaluated = [r["step"] for r in rows if r["modes2500"]]
    assert evaluated == ["3", "6"]  # the first run's final evaluation stays in the history
    assert extended["final"] == full["final"]
    # into a new folder: the history of the source run comes along, the source is untouched
    source_before = _files(run)
    moved = train(compose_cfg([*common, "max_steps=9", f"resume={run}"]), tmp_path / "moved")
    assert moved["g_steps"] == 9 and _files(run) == source_before
    moved_rows = _csv_rows(tmp_path / "moved" / "metrics.csv")
    assert [r["step"] for r in moved_rows if r["loss/d"]] == [str(s) for s in range(1, 10)]


# -- killed at a random moment --------------------------------------------------------------------------------------


def _cli(args: list[str], run: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.Popen(
        [sys.executable, str(TRAIN), f"hydra.run.dir={run}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for_rows(run: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        path = run / "metrics.csv"
        if path.is_file() and len(path.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run wrote fewer than {rows} rows in {timeout} s")


def test_sigkill_at_a_random_moment_then_resume_in_place_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    # log steps (multiples of 7) meet checkpoints (multiples of 50) only at 350: a kill almost always leaves rows
    # logged after the last checkpoint, which the resumed run must drop and log again
    args = [*RING, "max_steps=600", "ckpt_every=50", "log_every=7", "metrics.eval_every=200", "seed=5"]
    full = train(compose_cfg(args), tmp_path / "full")
    run = tmp_path / "killed"
    proc = _cli(args, run)
    _wait_for_rows(run, random.Random().randint(8, 60), proc)
    time.sleep(random.Random().uniform(0.0, 0.3))
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    rows_at_kill = _csv_rows(run / "metrics.csv")
    assert rows_at_kill, "rows are written when logged, not at the end"
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    resumed = train(compose_cfg([*args, "resume=auto"]), run)
    assert resumed["status"] == "completed"
    assert_same_training_state(_ckpt(tmp_path / "full"), _ckpt(run))
    assert resumed["final"] == {k: v for k, v in full["final"].items()} or all(
        resumed["final"][k] == v for k, v in full["final"].items() if k != "eval/seconds"
    )
    assert _csv_rows(run / "metrics.csv") == _csv_rows(tmp_path / "full" / "metrics.csv")  # every row, once


def test_the_csv_of_a_resumed_run_keeps_rows_up_to_the_checkpoint_and_nothing_after(tmp_path: Path) -> None:
    from ganlab.tracking import RunCSVLogger

    first = RunCSVLogger(tmp_path)
    for step in (7, 14, 21, 28):
        first.log_metrics({"loss/d": step / 10}, step=step)
    first.log_metrics({"fid2k": 3.0}, step=28)  # a new column: the file is rewritten once, rows kept
    resumed = RunCSVLogger(tmp_path, keep_until=20)  # the checkpoint was at step 20
    resumed.log_metrics({"loss/d": 9.9}, step=21)
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert [(r["step"], r["loss/d"]) for r in rows] == [("7", "0.7"), ("14", "1.4"), ("21", "9.9")]
    assert list(rows[0]) == ["step", "loss/d", "fid2k"]


# -- signals --------------------------------------------------------------------------------------------------------


class SignalAt(Trick):
    """A test-only trick: sends ``signum`` to this process during generator step ``step`` (mid-step)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.module, self.sent = step, signum, None, False

    def setup(self, module) -> None:
        self.module = module

    def after_update(self, player, net) -> None:
        if player == "D" and self.module.g_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_a_preemption_signal_writes_the_checkpoint_of_its_step(signum: int, tmp_path: Path) -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # stands in for submitit's requeue
    try:
        cfg = compose_cfg([*RING, "max_steps=50", "ckpt_every=20", "+tricks.sig._target_=test_records.SignalAt",
                           "+tricks.sig.step=7", f"+tricks.sig.signum={int(signum)}"])  # fmt: skip
        with pytest.raises(Interrupted) as info:
            train(cfg, tmp_path / "run")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert info.value.exit_code == 3 and info.value.step == 8  # arrived in step 8 (7 done): stopped after it
    assert _ckpt(tmp_path / "run")["ganlab"]["g_step"] == 8
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["g_steps"] == 8 and "resume=auto" in summary["resume"]
    assert calls == ([signal.SIGUSR2] if signum == signal.SIGUSR2 else [])  # USR2 handed on to the requeue
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM)
    )


def test_a_signal_during_a_call_of_several_steps_stops_at_its_end_with_that_steps_checkpoint(tmp_path: Path) -> None:
    # model.steps_per_call=10 (the MLP default) and callbacks due every 10 steps at most: the call of steps 11-20
    # runs on after the signal in step 14 and stops the run at 20, with step 20's checkpoint
    cfg = compose_cfg([*RING, "max_steps=400", "log_every=10", "ckpt_every=100", "model.steps_per_call=10",
                       "+tricks.sig._target_=test_records.SignalAt", "+tricks.sig.step=13",
                       f"+tricks.sig.signum={int(signal.SIGTERM)}"])  # fmt: skip
    with pytest.raises(Interrupted) as info:
        train(cfg, tmp_path / "run")
    assert info.value.step == 20 and _ckpt(tmp_path / "run")["ganlab"]["g_step"] == 20
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["g_steps"] == 20


_LATE_SIGNAL = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1]]
from conftest import compose_cfg
from test_records import RING
from ganlab import record
from ganlab.pipeline import train

save = record.RunRecord.try_save

def late(self):  # a SIGTERM as the finished run's record is written (SLURM's limit, a kill at the final line)
    if self.data.get("status") == "completed" and not getattr(self, "sent", False):
        self.sent = True
        os.kill(os.getpid(), signal.SIGTERM)
    return save(self)

record.RunRecord.try_save = late
train(compose_cfg([*RING, "max_steps=3", "metrics=none"]), Path(sys.argv[2]))
print("returned")
"""


def test_a_signal_while_the_finished_runs_record_is_written_leaves_it_completed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", _LATE_SIGNAL, tests, str(run)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "returned" in proc.stdout, proc.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_sigterm_on_the_command_line_exits_3_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _cli([*RING, "max_steps=100000", "ckpt_every=100000", "log_every=5"], run)
    _wait_for_rows(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: SIGTERM at generator step"), err
    step = _ckpt(run)["ganlab"]["g_step"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["g_steps"] == step > 0


# -- divergence -----------------------------------------------------------------------------------------------------


def test_a_forced_nan_is_diverged_with_a_finite_checkpoint(tmp_path: Path) -> None:
    poison = ["+tricks.poison._target_=conftest.NaNFrom", "+tricks.poison.step=3"]
    with pytest.raises(Diverged) as info:
        train(compose_cfg([*RING, "max_steps=50", "ckpt_every=2", "log_every=1000", *poison]), tmp_path / "bad")
    assert info.value.exit_code == 4
    message = str(info.value)
    assert "\n" not in message and "loss/d = nan" in message and "last good checkpoint: generator step 2" in message
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    ckpt = _ckpt(tmp_path / "bad")
    assert ckpt["ganlab"]["g_step"] == 2
    for state in ckpt["optimizer_states"]:
        for tensors in state["state"].values():
            assert all(torch.isfinite(t).all() for t in tensors.values() if torch.is_tensor(t))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_an_exploding_loss_is_divergence_too(tmp_path: Path) -> None:
    with pytest.raises(Diverged, match="no checkpoint was written"):
        train(compose_cfg([*RING, "max_steps=50", "log_every=1", "max_loss=1e-3"]), tmp_path / "run")


# -- faults of the machine ------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_failed_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pytorch_lightning as pl

    def full(self, filepath, *args, **kwargs):
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        Path(filepath).write_bytes(b"partial")  # what a disk that fills up mid-write leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", full)
    with pytest.raises(UserError) as info:
        train(compose_cfg([*RING, "max_steps=4", "ckpt_every=2"]), tmp_path / "run")
    assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_an_unwritable_run_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not writable"):
        train(compose_cfg([*RING, "max_steps=2"]), blocker / "run")


# -- W&B continues the same run -------------------------------------------------------------------------------------


def test_a_resumed_offline_wandb_run_keeps_its_id_and_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    common = [*RING, "logger=wandb", "log_every=2", "ckpt_every=4"]
    first = train(compose_cfg([*common, "max_steps=4"]), run)
    second = train(compose_cfg([*common, "max_steps=8", "resume=auto"]), run)
    assert second["wandb_id"] == first["wandb_id"]
    import wandb

    wandb.teardown()  # as at process exit: the W&B service has written everything it was given before we read
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(first["wandb_id"] in f.name for f in files)
    steps = []
    for f in files:
        steps.append([r.history.step.num for r in wandb_records(f) if r.WhichOneof("record_type") == "history"])
    assert steps[0] == [2, 4] and steps[1] == [6, 8]  # the resumed segment continues at the generator step


def test_an_unreachable_wandb_server_delays_training_by_at_most_15_s(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    run = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN), f"hydra.run.dir={run}", *RING, "max_steps=2", "logger=wandb",
           "logger.wandb.mode=online"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    start = proc.stdout.splitlines()[0]  # the run's one start line says how it logs, and why
    assert "W&B offline (online start failed" in start and proc.stdout.count("online start failed") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    # train() began before W&B was tried: its wall time holds the capped online attempt (10 s), the offline
    # start and two generator steps; an uncapped attempt took 105 s
    assert summary["wall_time_s"] < 15 + 10, summary["wall_time_s"]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_all_finite_reads_parameters_buffers_and_optimizer_state() -> None:
    """The check before every checkpoint: a NaN or inf anywhere in the nets or Adam's state fails it (on a GPU the
    state spans two devices: tests/test_gpu.py)."""
    from ganlab.checkpoint import all_finite

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(8, 3)).sum().backward()
    opt.step()
    assert all_finite([net], [opt])
    for where in (net[0].weight.data, net[1].running_var, opt.state[net[0].bias]["exp_avg_sq"]):
        for bad in (float("nan"), float("inf")):
            kept = where.flatten()[0].item()
            where.view(-1)[0] = bad
            assert not all_finite([net], [opt]), (where.shape, bad)
            where.view(-1)[0] = kept
            assert all_finite([net], [opt])
