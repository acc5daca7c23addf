"""Evaluating and sampling saved models: with the run's own protocol an evaluation reproduces the run's final
metrics exactly, a new protocol is written beside the training's results (never over them) and reaches the report,
the run's W&B run gets the metrics without a second metrics.csv, and sampling writes files, a grid and a latent
interpolation as the data set's preview kind says."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, compose_cfg, wandb_records
from ganlab.errors import UserError
from ganlab.evaluate import evaluate
from ganlab.evaluate import main as eval_main
from ganlab.generate import generate, lerp, slerp
from ganlab.generate import main as generate_main
from ganlab.pipeline import train

TINY = ["max_steps=4", "log_every=2", "sample_every=4", "ckpt_every=4", "batch_size=16", "metrics.eval_every=4"]
RUNS = {
    # the ring logs to W&B (offline): the evaluation must reach the same W&B run
    "ring8": ["data=ring8", "logger=wandb", "model.generator.width=16", "model.discriminator.width=16"],
    "digits": ["data=digits", "logger=csv", "metrics.n_samples=300", "metrics.kid_subset_size=100"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained run per data set (module scope: trained once for every test here)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for name, overrides in RUNS.items():
            cfg = compose_cfg([*overrides, *TINY])
            identity = {"overrides": [*overrides, *TINY], "choices": {"data": name, "loss": "non_saturating"}}
            summary = train(cfg, root / "sweep" / name, identity=identity)
            assert summary["status"] == "completed"
            out[name] = root / "sweep" / name
    return out


def _eval_metric_names(entry: dict) -> list[str]:
    return sorted(entry["metrics"])


@pytest.mark.parametrize("name", list(RUNS))
def test_an_evaluation_with_the_runs_protocol_reproduces_its_final_metrics_exactly(
    runs: dict[str, Path], name: str
) -> None:
    run = runs[name]
    summary_before = (run / "summary.json").read_bytes()
    csv_before = (run / "metrics.csv").read_bytes()
    wandb_before = set((run / "wandb").glob("*run-*")) if (run / "wandb").is_dir() else set()

    entry = evaluate(run)

    final = json.loads(summary_before)["final"]
    names = _eval_metric_names(entry)
    assert names and set(names) <= set(final), (names, sorted(final))
    assert any(n.endswith(("2500", "300")) for n in names)  # protocol-named metrics, not only diagnostics
    for metric in names:
        assert entry["metrics"][metric] == final[metric], metric  # exactly: same weights, same protocol
    # the training's record is untouched; the evaluation lives beside it
    assert (run / "summary.json").read_bytes() == summary_before
    assert (run / "metrics.csv").read_bytes() == csv_before
    stored = json.loads(Path(entry["path"]).read_text())
    assert stored["metrics"] == entry["metrics"] and stored["g_step"] == 4
    index = json.loads((run / "evals" / "index.json").read_text())["evals"]
    assert index[-1]["file"] == Path(entry["path"]).name
    if name == "ring8":  # the same W&B run (its id) got the evaluation, offline
        wandb_id = json.loads(summary_before)["wandb_id"]
        new = set((run / "wandb").glob("*run-*")) - wandb_before
        assert new and all(wandb_id in p.name for p in new), new
        (path,) = [p for d in new for p in d.glob(f"run-{wandb_id}.wandb")]
        # summary values under the evaluation's own names, never a history row (its W&B step could not be known
        # offline, and a later extension of the run would log over it) and never the training's names. W&B's
        # service may still be writing the offline file when finish() returns: read it until its summary is there
        deadline = time.monotonic() + 30
        while True:
            records = wandb_records(path)
            summary = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
                       if r.WhichOneof("record_type") == "summary" for i in r.summary.update}  # fmt: skip
            if "evals/run_protocol/g_step" in summary or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not [r for r in records if r.WhichOneof("record_type") == "history"]
        assert summary["evals/run_protocol/modes2500"] == final["modes2500"]
        assert summary["evals/run_protocol/g_step"] == 4 and "modes2500" not in summary


def test_two_evaluations_of_one_run_at_once_both_reach_its_index(runs: dict[str, Path], monkeypatch) -> None:
    from ganlab.metrics.callback import Evaluation

    run, original = runs["ring8"], Evaluation.evaluate

    def with_another(self, trainer, module, final=True):  # a second evaluation runs while this one computes
        monkeypatch.setattr(Evaluation, "evaluate", original)
        inner.append(evaluate(run, ["metrics.n_samples=300"], log=False))
        return original(self, trainer, module, final)

    inner: list[dict] = []
    monkeypatch.setattr(Evaluation, "evaluate", with_another)
    outer = evaluate(run, ["metrics.n_samples=400"], log=False)
    files = [e["file"] for e in json.loads((run / "evals" / "index.json").read_text())["evals"]]
    assert Path(inner[0]["path"]).name in files and Path(outer["path"]).name in files


def test_another_protocol_is_a_new_result_under_its_own_names_and_reaches_the_report(runs: dict[str, Path]) -> None:
    from ganlab.report import write_report

    run = runs["ring8"]
    first = evaluate(run, ["metrics.n_samples=500"], log=False)
    second = evaluate(run, ["metrics.n_samples=500"], log=False)
    assert "modes500" in first["metrics"] and "modes2500" not in first["metrics"]
    assert Path(first["path"]).name == "n_samples500.json" and Path(second["path"]).name == "n_samples500-2.json"
    assert json.loads(Path(first["path"]).read_text())["metrics"] == first["metrics"]  # not overwritten
    report = write_report(run.parent, plots=False)
    row = report["datasets"]["ring8"]["arms"][0]
    assert row["metrics"]["modes500"]["mean"] == first["metrics"]["modes500"]
    assert row["metrics"]["modes2500"]["mean"] == json.loads((run / "summary.json").read_text())["final"]["modes2500"]


def test_a_bad_override_or_target_is_one_line_and_exit_code_2(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(UserError, match=r"metrics\.no_such_key"):
        evaluate(runs["ring8"], ["metrics.no_such_key=3"], log=False)
    (tmp_path / "not_a_run").mkdir()
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.yaml").write_text((runs["ring8"] / "config.yaml").read_text())
    bad_ckpt = tmp_path / "bad.ckpt"
    bad_ckpt.write_text("not a checkpoint")
    for target, needle in [
        (tmp_path / "missing", "no such run folder"),
        (tmp_path / "not_a_run", "not a run folder"),
        (no_ckpt, "no checkpoint at"),
        (bad_ckpt, "not a run folder"),
    ]:
        for main in (eval_main, generate_main):
            assert main([str(target)]) == 2
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    # the entry script itself
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "eval.py"), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_generate_writes_points_as_npz_with_a_grid_and_an_interpolation(runs: dict[str, Path]) -> None:
    written = generate(runs["ring8"], n=100, steps=9)
    folder = Path(written["folder"])
    assert folder.parent == runs["ring8"] / "generated"
    data = np.load(folder / "samples.npz")
    assert data["x"].shape == (100, 2) and data["interpolation"].shape == (9, 2)
    assert (folder / "grid.png").stat().st_size > 0 and (folder / "interpolation.png").stat().st_size > 0
    again = generate(runs["ring8"], n=100, steps=9)
    assert again["folder"] != written["folder"]  # never over an earlier output
    np.testing.assert_array_equal(np.load(Path(again["folder"]) / "samples.npz")["x"], data["x"])  # seeded


def test_generate_writes_one_image_per_sample_for_image_data(runs: dict[str, Path], tmp_path: Path) -> None:
    assert generate_main([str(runs["digits"]), "n=12", "steps=8", f"out={tmp_path / 'gen'}"]) == 0
    files = sorted((tmp_path / "gen" / "images").glob("*.png"))
    assert len(files) == 12 and Image.open(files[0]).size == (8, 8)
    strip = Image.open(tmp_path / "gen" / "interpolation.png")
    assert strip.size[0] > 7 * strip.size[1]  # one row of 8 images
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert generate_main([str(runs["digits"]), "n=zero"]) == 2


def test_slerp_follows_the_great_circle_and_lerp_the_chord() -> None:
    z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    path = slerp(z0, z1, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    # equal steps of angle on the unit circle (a Gaussian's mass lies near a sphere; the chord cuts inside it)
    torch.testing.assert_close(torch.atan2(path[:, 1], path[:, 0]), torch.linspace(0, torch.pi / 2, 5))
    torch.testing.assert_close(path.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(lerp(z0, z1, torch.tensor([0.5]))[0], torch.tensor([0.5, 0.5]))


def test_the_installed_train_command_composes_from_any_folder(tmp_path: Path) -> None:
    """``ganlab-train`` is ``ganlab.train:main``: the checkout's (or the packaged) configs, from any working folder;
    ``--cfg job`` prints the composed config without training; a bad key is one line and exit code 2."""
    from ganlab.paths import conf_dir

    assert conf_dir() == ROOT / "conf"
    entry = [sys.executable, "-c", "from ganlab.train import main; main()"]
    proc = subprocess.run([*entry, "data=ring8", "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ganlab.nets.MLPGenerator" in proc.stdout and not (tmp_path / "outputs").exists()  # ring8 picks the MLP
    bad = subprocess.run([*entry, "data=nope"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and bad.stderr.strip().count("\n") == 0
