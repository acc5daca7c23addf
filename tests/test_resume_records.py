"""Resuming never costs a run its record: a refused resume changes no file, a resume into a folder that holds
another run is refused, a run interrupted in its last step can still be completed, and extending a finished run
keeps what the finished run said (its status, final metrics, config and checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, compose_cfg
from ganlab.errors import UserError
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
