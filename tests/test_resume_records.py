"""Resuming never costs a run its record: a refused resume changes no file, a resume into a folder that holds
another run is refused, a run interrupted in its last step can still be completed, and extending a finished run
keeps what the finished run said (its status, final metrics, config and checkpoint)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg
from ganlab.errors import UserError
from ganlab.evaluate import load_run
from ganlab.pipeline import train

RING = [*TINY, "model.lr_decay=none", "metrics=none"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_a_refused_resume_leaves_a_completed_run_byte_identical(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_cfg([*RING, "max_steps=3", "loss=minimax"]), run)
    before = _files(run)
    assert _summary(run)["status"] == "completed"
    # another loss: the checkpoint's settings differ, so the resume is refused (after loading and building)
    with pytest.raises(UserError, match="differs from the checkpoint"):
        train(compose_cfg([*RING, "max_steps=6", "loss=non_saturating", "resume=auto"]), run)
    after = _files(run)
    for name in ("summary.json", "config.yaml", "checkpoints/last.ckpt"):
        assert after[name] == before[name], name
    assert after == before  # no file added, none changed


def test_a_checkpoint_of_other_network_shapes_is_refused_before_any_write(tmp_path: Path) -> None:
    # same settings, networks built by another version of the code (the minibatch layer's T on a flattened map
    # before 2bb32aa): one line naming the tensor, the folder unchanged, not a state-dict trace after the writes
    run = tmp_path / "run"
    train(compose_cfg([*RING, "max_steps=3"]), run)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    weight = state["state_dict"]["D.head.weight"]
    state["state_dict"]["D.head.weight"] = torch.cat([weight, weight[:, :2]], dim=1)
    torch.save(state, ckpt)
    before = _files(run)
    with pytest.raises(UserError, match=r"another shape \(D.head.weight \[1, 18\] in the checkpoint, \[1, 16\] here"):
        train(compose_cfg([*RING, "max_steps=6", "resume=auto"]), run)
    assert _files(run) == before
    with pytest.raises(UserError, match=r"another shape \(D.head.weight"):  # src/eval.py and src/generate.py too
        load_run(run)


def test_a_cluster_started_rank_refuses_what_rank_0_refuses(tmp_path: Path) -> None:
    # under SLURM every rank starts itself: a rank > 0 that did not refuse a mismatched checkpoint would wait at the
    # rendezvous (up to GANLAB_DDP_TIMEOUT_S) for a rank 0 that has already left with its one line
    from ganlab.pipeline import train_rank

    run = tmp_path / "run"
    train(compose_cfg([*RING, "max_steps=3", "loss=minimax"]), run)
    ckpt = run / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="differs from the checkpoint"):
        train_rank(compose_cfg([*RING, "max_steps=6", "loss=non_saturating"]), run, ckpt)


def test_a_new_run_that_fails_while_building_records_why(tmp_path: Path) -> None:
    # only a folder that holds a run waits for every check before writing; a new one says how it ended
    empty = tmp_path / "images"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        train(compose_cfg([*RING, "data=folder", f"data.path={empty}"]), tmp_path / "run")
    summary = _summary(tmp_path / "run")
    assert summary["status"] == "failed" and "no images" in summary["error"]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_a_resume_from_another_run_into_a_folder_holding_a_run_is_refused(tmp_path: Path) -> None:
    source, victim = tmp_path / "source", tmp_path / "victim"
    train(compose_cfg([*RING, "max_steps=3"]), source)
    train(compose_cfg([*RING, "max_steps=3", "seed=1"]), victim)
    source_before, victim_before = _files(source), _files(victim)
    with pytest.raises(UserError, match="already holds a run") as info:
        train(compose_cfg([*RING, "max_steps=6", f"resume={source}"]), victim)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    assert _files(victim) == victim_before and _files(source) == source_before
    # the folder's own checkpoint named as a path is this folder's run: it extends
    extended = train(compose_cfg([*RING, "max_steps=6", "seed=1", f"resume={victim}"]), victim)
    assert extended["status"] == "completed" and extended["g_steps"] == 6


def test_a_signal_in_the_last_step_completes_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # the signal arrives during step 5 of 5: that step is evaluated and saved, nothing is left to stop
    cfg = compose_cfg([*RING, "max_steps=5", "+tricks.sig._target_=test_records.SignalAt", "+tricks.sig.step=4",
                       f"+tricks.sig.signum={int(signal.SIGTERM)}"])  # fmt: skip
    summary = train(cfg, run)
    assert summary["status"] == "completed" and summary["g_steps"] == 5 and summary["final"]
    assert _summary(run)["status"] == "completed"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["ganlab"]["g_step"] == 5


def test_a_run_recorded_as_interrupted_at_its_last_step_is_completed_by_resume_auto(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*RING, "max_steps=4", "log_every=1"]
    done = train(compose_cfg(args), run)
    # what a SIGTERM in the last step left before: last.ckpt at max_steps, the record interrupted, no final
    stuck = {k: v for k, v in done.items() if k != "final"}
    stuck.update(status="interrupted", g_steps=4, error="SIGTERM at generator step 4", resume="rerun with resume=auto")
    (run / "summary.json").write_text(json.dumps(stuck))
    files = {k: v for k, v in _files(run).items() if k != "summary.json"}
    summary = train(compose_cfg([*args, "resume=auto"]), run)
    assert summary["status"] == "completed" and summary["g_steps"] == 4
    assert summary["final"] == done["final"]  # read back from metrics.csv
    assert "error" not in summary and "resume" not in summary
    assert summary["attempts"][-1]["before"]["status"] == "interrupted"
    assert _summary(run) == json.loads(json.dumps(summary))
    assert {k: v for k, v in _files(run).items() if k != "summary.json"} == files  # nothing else touched
    # and from then on it is a complete run: re-running it changes nothing
    before = _files(run)
    assert train(compose_cfg([*args, "resume=auto"]), run)["status"] == "completed"
    assert _files(run) == before


def test_extending_a_completed_run_keeps_its_completed_record_and_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(compose_cfg([*RING, "max_steps=3"]), run)
    ckpt_before = (run / "checkpoints" / "last.ckpt").read_bytes()
    extended = train(compose_cfg([*RING, "max_steps=6", "resume=auto"]), run)
    assert extended["status"] == "completed" and extended["g_steps"] == 6
    entry = extended["attempts"][-1]
    before = entry["before"]
    assert before["status"] == "completed" and before["final"] == first["final"] and before["g_steps"] == 3
    assert before["train_time_s"] == first["train_time_s"] and before["wall_time_s"] == first["wall_time_s"]
    assert entry["kept_checkpoint"] == "checkpoints/step_0000003.ckpt"
    assert (run / entry["kept_checkpoint"]).read_bytes() == ckpt_before  # the completed run's checkpoint, as it was
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["ganlab"]["g_step"] == 6
    assert _summary(run)["attempts"][-1]["before"] == before
    # the kept step-3 checkpoint is behind last.ckpt: training from it here would rewrite rows 4-6 and their
    # samples, so it is refused (it branches into a new folder), and the folder stays as it is
    files = _files(run)
    with pytest.raises(UserError, match=r"behind this folder's last\.ckpt"):
        train(compose_cfg([*RING, "max_steps=8", f"resume={run / entry['kept_checkpoint']}"]), run)
    assert _files(run) == files
    branch = train(compose_cfg([*RING, "max_steps=8", f"resume={run / entry['kept_checkpoint']}"]), tmp_path / "b")
    assert branch["status"] == "completed" and branch["g_steps"] == 8


def test_each_attempt_keeps_its_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_cfg([*RING, "max_steps=3"]), run)
    first = (run / "config.yaml").read_bytes()
    train(compose_cfg([*RING, "max_steps=5", "model.optim_g.lr=0.0001", "resume=auto"]), run)
    second = (run / "config.yaml").read_bytes()
    assert (run / "config.attempt1.yaml").read_bytes() == first and b"max_steps: 5" in second
    summary = train(compose_cfg([*RING, "max_steps=7", "resume=auto"]), run)
    assert (run / "config.attempt1.yaml").read_bytes() == first  # an earlier copy is never rewritten
    assert (run / "config.attempt2.yaml").read_bytes() == second and b"max_steps: 7" in (
        run / "config.yaml"
    ).read_bytes()
    assert [a["before"]["config"] for a in summary["attempts"]] == ["config.attempt1.yaml", "config.attempt2.yaml"]
    assert not list(run.glob("*.tmp"))


def test_each_attempt_keeps_its_overrides_and_times_and_the_totals_add_up(tmp_path: Path) -> None:
    run = tmp_path / "run"
    identity = {"overrides": ["max_steps=3"]}
    first = train(compose_cfg([*RING, "max_steps=3"]), run, identity=identity)
    train(
        compose_cfg([*RING, "max_steps=5", "resume=auto"]), run, identity={"overrides": ["max_steps=5", "resume=auto"]}
    )
    last = train(compose_cfg([*RING, "max_steps=7", "resume=auto"]), run, identity={"overrides": ["max_steps=7"]})
    a, b = last["attempts"]
    assert a["before"]["overrides"] == ["max_steps=3"] and a["overrides"] == ["max_steps=5", "resume=auto"]
    assert b["overrides"] == ["max_steps=7"] == last["overrides"]
    assert a["status"] == b["status"] == "completed" and (a["g_steps"], b["g_steps"]) == (5, 7)
    for key in ("train_time_s", "wall_time_s", "eval_time_s"):
        own = [first[key], a[key], b[key]]
        assert a["before"][key] == first[key]
        assert b["before"][key] == pytest.approx(first[key] + a[key], abs=0.011)  # the totals before attempt 3
        assert last[key] == pytest.approx(sum(own), abs=0.021), (key, own, last[key])
        assert last[key] >= max(own)


def test_a_branch_into_a_new_folder_gets_its_own_wandb_run_and_eval_keeps_the_runs_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from ganlab import tracking
    from ganlab.evaluate import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [*TINY, "model.lr_decay=none", "logger=wandb"]
    source = train(compose_cfg([*common, "max_steps=3"]), tmp_path / "a")
    wandb.teardown()  # the W&B service writes its logs until it ends
    before = _files(tmp_path / "a")
    branch = train(compose_cfg([*common, "max_steps=5", f"resume={tmp_path / 'a'}"]), tmp_path / "b")
    assert branch["wandb_id"] != source["wandb_id"] and branch["parent_wandb_id"] == source["wandb_id"]
    assert branch["attempts"][-1]["parent_wandb_id"] == source["wandb_id"]
    wandb.teardown()
    assert _files(tmp_path / "a") == before
    # resuming the branch in its own folder continues the branch's W&B run
    again = train(compose_cfg([*common, "max_steps=6", "resume=auto"]), tmp_path / "b")
    assert again["wandb_id"] == branch["wandb_id"] and again["parent_wandb_id"] == source["wandb_id"]
    wandb.teardown()
    # an evaluation logs into the run's W&B run without replacing the config it trained with
    seen: list[dict] = []
    original = tracking.StepWandbLogger.__init__

    def spy(self, **kwargs):
        seen.append(kwargs)
        original(self, **kwargs)

    monkeypatch.setattr(tracking.StepWandbLogger, "__init__", spy)
    evaluate(tmp_path / "b", ["metrics.n_samples=200"])
    wandb.teardown()
    assert seen and all(k["id"] == branch["wandb_id"] and k.get("config") is None for k in seen)


def test_resume_auto_after_a_kill_before_the_first_checkpoint_keeps_the_earlier_attempts_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(compose_cfg([*RING, "max_steps=3"]), run)
    # what a SIGKILL before the first checkpoint leaves: rows, a config, a running record, no checkpoint
    (run / "checkpoints" / "last.ckpt").unlink()
    killed = {**_summary(run), "status": "running"}
    killed.pop("final")
    (run / "summary.json").write_text(json.dumps(killed))
    rows, config = (run / "metrics.csv").read_bytes(), (run / "config.yaml").read_bytes()
    capsys.readouterr()
    summary = train(compose_cfg([*RING, "max_steps=4", "resume=auto"]), run)
    assert "training from generator step 0" in capsys.readouterr().out
    assert summary["status"] == "completed" and summary["g_steps"] == 4
    assert (run / "metrics.attempt1.csv").read_bytes() == rows and (run / "config.attempt1.yaml").read_bytes() == config
    entry = summary["attempts"][-1]
    assert entry["restarted"] and entry["before"]["status"] == "running"
    assert entry["kept"] == ["metrics.attempt1.csv", "config.attempt1.yaml"]
    assert b"max_steps: 4" in (run / "config.yaml").read_bytes()


def test_resume_auto_on_a_completed_run_without_its_checkpoint_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_cfg([*RING, "max_steps=3"]), run)
    (run / "checkpoints" / "last.ckpt").unlink()
    before = _files(run)
    with pytest.raises(UserError, match=r"completed run but no checkpoints/last\.ckpt"):
        train(compose_cfg([*RING, "max_steps=3", "resume=auto"]), run)
    assert _files(run) == before
