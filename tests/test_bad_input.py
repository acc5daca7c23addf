"""Bad input, in the table the README shows: every case exits with code 2 and one line that names the key, and
nothing trains on nonsense. Most cases run in-process (the same code path as ``src/train.py``); a few go through
the real command line to check what the user sees."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg, run_cli
from ganlab.cli import precheck
from ganlab.errors import RunStopped
from ganlab.pipeline import train

RING = [*TINY, "max_steps=2"]
DIGITS = ["data=digits", "logger=csv", "max_steps=2", "batch_size=8", "model.generator.width=8",
          "model.discriminator.width=8", "sample_every=2", "ckpt_every=2"]  # fmt: skip

# (overrides, the key the one-line message must name)
CASES: list[tuple[list[str], str]] = [
    (["seed=-1"], "seed"),
    (["seed=abc"], "seed"),
    (["seed=1.5"], "seed"),
    (["d_steps=0"], "d_steps"),
    (["d_steps=1.5"], "d_steps"),
    (["max_steps=0"], "max_steps"),
    (["max_steps=abc"], "max_steps"),
    (["log_every=0"], "log_every"),
    (["sample_every=-5"], "sample_every"),
    (["ckpt_every=0"], "ckpt_every"),
    (["batch_size=0"], "batch_size"),
    (["batch_size=abc"], "batch_size"),
    (["max_loss=0"], "max_loss"),
    (["model.optim_g.lr=abc"], "model.optim_g.lr"),
    (["model.optim_d.lr=-0.1"], "model.optim_d.lr"),
    (["model.optim_d.lr=0"], "model.optim_d.lr"),
    (["model.optim_g.lr=1e3"], "model.optim_g.lr"),
    (["model.optim_g.lr=inf"], "model.optim_g.lr"),
    (["model.optim_g.lr=nan"], "model.optim_g.lr"),
    (["model.optim_d.betas=[0.5]"], "model.optim_d.betas"),
    (["model.optim_d.betas=[0.5,1.5]"], "model.optim_d.betas"),
    (["model.optim_g.betas=abc"], "model.optim_g.betas"),
    (["model.threads=0"], "model.threads"),
    (["model.steps_per_call=0"], "model.steps_per_call"),
    (["model.steps_per_call=2.5"], "model.steps_per_call"),
    (["model.steps_per_call=fast"], "model.steps_per_call"),
    (["model.noise=cauchy"], "model.noise"),
    (["model.lr_decay=cosine"], "model.lr_decay"),
    (["model.lr_decay_from=1"], "model.lr_decay_from"),
    (["model.z_dim=0"], "z_dim"),
    (["model.generator.width=0"], "width"),
    (["model.discriminator.width=0"], "width"),
    (["model.discriminator.depth=0"], "depth"),
    (["model=dcgan"], "model=dcgan"),
    (["loss=feature_matching", "loss.layers=[99]"], "loss.layers"),
    (["loss=feature_matching", "loss.layers=[]"], "loss.layers"),
    (["loss=feature_matching", "loss.layers=[0,0]"], "loss.layers: [0, 0] names layer 0 twice"),
    (["loss=ns_then_minimax", "loss.switch_step=-1"], "loss.switch_step"),
    (["tricks=[virtual_batch_norm]", "tricks.virtual_batch_norm.ref_batch_size=0"], "ref_batch_size"),
    (["tricks=[label_smoothing]", "tricks.label_smoothing.alpha=1.5"], "alpha"),
    (["tricks=[historical_averaging]", "tricks.historical_averaging.weight=-1"], "weight"),
    (["tricks=[historical_averaging]", "tricks.historical_averaging.players=[X]"], "players"),
    (["tricks=[minibatch_discrimination]", "tricks.minibatch_discrimination.n_kernels=0"], "n_kernels"),
    (["tricks=[batch_norm_d]", "+tricks.again._target_=ganlab.tricks.BatchNormD"], "norm"),
    (["trainer.accelerator=gpu"], "trainer.accelerator"),
    (["trainer.accelerator=tpu9"], "trainer.accelerator"),
    (["trainer.precision=bogus"], "trainer.precision"),
    (["+trainer.max_steps=5"], "trainer.max_steps"),
    (["trainer.devices=0"], "trainer.devices"),
    (["trainer.num_nodes=2"], "trainer.num_nodes"),
    (["logger=wandb", "logger.wandb.mode=bogus"], "logger.wandb.mode"),
    (["metrics.eval_every=0"], "metrics.eval_every"),
    (["metrics.n_samples=0"], "metrics.n_samples"),
    (["metrics.n_samples=1"], "metrics.n_samples"),
    (["metrics.kid_subset_size=0"], "metrics.kid_subset_size"),
    (["metrics.inception_weights=/nonexistent.pth"], "metrics.inception_weights"),
    (["data=folder"], "data.path"),
    (["task=semi_supervised", "data=digits", "task.labels_per_class=500"], "task.labels_per_class"),
    (["task=semi_supervised", "data=digits", "task.unsupervised_weight=-1"], "task.unsupervised_weight"),
    (["resume=/nonexistent/run"], "resume"),
    # Hydra-level mistakes: composed before anything runs
    (["d_stepz=3"], "d_stepz"),
    (["loss=bogus"], "loss"),
    (["tricks=[bogus]"], "tricks"),
    (["seed=[1"], "[1"),
]


def run_inprocess(overrides: list[str], run_dir: Path) -> tuple[int, str]:
    """What ``python src/train.py <overrides>`` exits with and prints, without a new process."""
    reason = precheck(overrides)
    if reason is not None:
        return 2, f"error: {reason}"
    try:
        train(compose_cfg(overrides), run_dir)
    except RunStopped as exc:
        return exc.exit_code, f"{exc.label}: {exc}"
    return 0, ""


@pytest.mark.parametrize(("overrides", "key"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_naming_the_key_and_exit_code_2(overrides: list[str], key: str, tmp_path: Path) -> None:
    base = DIGITS if any(o.startswith(("task=", "model=dcgan")) for o in overrides) else RING
    if overrides == ["model=dcgan"]:
        base = RING  # DCGAN nets on 2-D points
    code, line = run_inprocess([*base, *overrides], tmp_path / "run")
    assert code == 2, line
    assert "\n" not in line and line.startswith("error: ")
    assert key in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_the_table_has_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


# -- files handed to resume ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(compose_cfg([*RING, "max_steps=4", "ckpt_every=2"]), run)
    return run


class Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_files(tmp_path: Path, finished: Path) -> dict[str, tuple[Path, str]]:
    ckpt = finished / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    crafted = tmp_path / "crafted.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["ganlab"]["payload"] = Payload(tmp_path / "PWNED")
    torch.save(state, crafted)
    return {"truncated": (truncated, "not a readable checkpoint"), "text": (text, "not a readable checkpoint"),
            "crafted": (crafted, "refused")}  # fmt: skip


@pytest.mark.parametrize("kind", ["truncated", "text", "crafted"])
def test_a_bad_checkpoint_file_is_one_line(kind: str, tmp_path: Path, finished_run: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    path, needle = _bad_files(tmp_path, finished_run)[kind]
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # an environment that would let pickles run
    code, line = run_inprocess([*RING, "max_steps=6", f"resume={path}"], tmp_path / "run")
    assert code == 2 and "\n" not in line and needle in line and "resume" in line, line
    assert not (tmp_path / "PWNED").exists()  # the payload never ran


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["data=grid25"], ["data._target_"]),
        (["model.discriminator.width=32"], ["model.discriminator.width"]),
        (["loss=minimax"], ["loss._target_"]),
        (["d_steps=2", "batch_size=16"], ["batch_size", "d_steps"]),
        (["tricks=[label_smoothing]"], ["tricks.label_smoothing"]),
    ],
)
def test_resume_under_other_settings_lists_the_keys_that_differ(
    overrides: list[str], keys: list[str], tmp_path: Path, finished_run: Path
) -> None:
    code, line = run_inprocess([*RING, "max_steps=6", f"resume={finished_run}", *overrides], tmp_path / "run")
    assert code == 2 and "\n" not in line, line
    for key in keys:
        assert key in line, line


def test_a_budget_below_the_checkpoint_is_refused(tmp_path: Path, finished_run: Path) -> None:
    code, line = run_inprocess([*RING, "max_steps=3", f"resume={finished_run}"], tmp_path / "run")
    assert code == 2 and "max_steps=3" in line and "step 4" in line, line


# -- what the user sees on the real command line ----------------------------------------------------------------


# one refusal before anything loads (a misspelt key) and one from the run itself (every other case of the table
# above takes that same path in-process)
@pytest.mark.parametrize("override", ["d_stepz=3", "trainer.devices=0"])
def test_the_command_line_prints_exactly_one_line(override: str, tmp_path: Path) -> None:
    proc = run_cli(["data=ring8", "logger=csv", override], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()  # refused before anything was written


def test_pickle_is_not_what_checkpoints_are_made_of(finished_run: Path) -> None:
    # the project's own checkpoints load as data: nothing in them needs code to unpickle
    state = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["ganlab"]["g_step"] == 4
    with pytest.raises(pickle.UnpicklingError):
        torch.load(_bad_files(finished_run.parent, finished_run)["crafted"][0], weights_only=True)
    assert json.loads((finished_run / "summary.json").read_text())["status"] == "completed"


# -- preflight: what a run needs is checked before its first step ---------------------------------------------------


def test_an_offline_inception_run_fails_before_its_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.new("RGB", (8, 8), color=(i * 20, 0, 0)).save(images / f"{i}.png")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached Inception weights
    args = ["data=folder", f"data.path={images}", "data.resolution=8", "model=dcgan", "model.generator.width=8",
            "model.discriminator.width=8", "logger=csv", "batch_size=4", "max_steps=50", "ckpt_every=1",
            "metrics.eval_every=25", f"metrics.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    code, line = run_inprocess(args, tmp_path / "run")
    assert code == 2 and "\n" not in line and "Inception-v3 weights" in line, line
    assert "metrics.inception_weights=" in line  # what to do about it
    assert not (tmp_path / "run" / "checkpoints").exists()  # not one step trained
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_local_inception_weights_that_would_run_code_are_refused(tmp_path: Path) -> None:
    from ganlab.errors import UserError
    from ganlab.metrics.fidelity import INCEPTION_EXTRACTOR, preflight

    crafted = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1), "x": Payload(tmp_path / "PWNED")}, crafted)
    with pytest.raises(UserError, match="not a plain weights file"):
        preflight(INCEPTION_EXTRACTOR, crafted)
    assert not (tmp_path / "PWNED").exists()
