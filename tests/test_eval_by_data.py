"""Evaluation is chosen by what a data set declares (its ``EvalSpec``), never by its name; every metric name
states its protocol; ``metrics=none`` is a null node; the metrics keys are checked by the callback itself."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import TINY, compose_cfg
from ganlab.data import EvalSpec, InMemoryData, load_digits_uint8
from ganlab.errors import UserError
from ganlab.metrics.callback import Evaluation
from ganlab.metrics.evaluator import build_evaluator
from ganlab.metrics.modes import MixtureModes
from ganlab.metrics.protocol import DIGITS_EXTRACTOR
from ganlab.pipeline import callbacks, train


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANLAB_CACHE", str(tmp_path / "cache"))


class Triangle(InMemoryData):
    """A data set the package does not know: three Gaussians, its own centres, its own protocol (300 samples)."""

    name, kind = "triangle", "points"
    centers = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    std = 0.02
    evaluation = EvalSpec(samples=300, modes=MixtureModes(), preview="scatter")

    def load(self):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(3, (600,), generator=g)
        x = self.centers[y] + self.std * torch.randn(600, 2, generator=g)
        return x[:300], y[:300], x[300:], y[300:]


class FewDigits(InMemoryData):
    """A data set the package does not know, declaring the shipped digits CNN as its feature extractor."""

    name = "few_digits"
    evaluation = EvalSpec(samples=200, features=DIGITS_EXTRACTOR)

    def load(self):
        train_x, train_y, test_x, test_y = load_digits_uint8()
        return train_x[:600], train_y[:600], test_x, test_y


def test_a_new_mixture_data_set_gets_mode_metrics_named_by_its_sample_count():
    data = Triangle()
    ev = build_evaluator(data, device="cpu")
    out = ev(data.test_x)
    assert set(out) == {"modes300", "hq_fraction300", "reverse_kl300"}
    # 2-D Gaussian: P(r > 3 std) = exp(-4.5) = 1.1 %
    assert out["modes300"] == 3 and out["hq_fraction300"] > 0.97 and out["reverse_kl300"] < 0.02
    # its own centres are used: all samples on the first centre is one mode of three
    collapsed = ev(Triangle.centers[:1].repeat(300, 1))
    assert collapsed["modes300"] == 1 and collapsed["hq_fraction300"] == 1.0
    # metrics.n_samples changes the protocol, and the names follow it
    assert set(build_evaluator(data, n_samples=120, device="cpu")(data.test_x)) == {
        "modes120",
        "hq_fraction120",
        "reverse_kl120",
    }


def test_a_new_image_data_set_declaring_the_digits_cnn_gets_fidelity_metrics():
    data = FewDigits()
    ev = build_evaluator(data, device="cpu", kid_subset_size=100)
    real = ev(data.test_x)
    names = {"fid200", "is200", "is200_std", "kid200", "kid200_std", "precision200", "recall200"}
    assert set(real) == names  # no mode metrics: none declared
    one = ev(data.test_x[:1].repeat(200, 1, 1, 1))
    assert real["fid200"] < 0.1 * one["fid200"]  # the digits CNN's features, not noise


def test_a_data_set_declaring_nothing_gets_no_metrics():
    class Plain(InMemoryData):
        name = "plain"

        def load(self):
            x = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
            return x, None, x, None

    assert build_evaluator(Plain(), device="cpu")(torch.zeros(2000, 1, 8, 8, dtype=torch.uint8)) == {}


def test_eval_spec_rejects_an_unknown_preview():
    with pytest.raises(ValueError, match="preview"):
        EvalSpec(preview="heatmap")


# -- the callback ----------------------------------------------------------------------------------------------
class _ZeroD(nn.Module):
    def forward(self, x):
        return torch.zeros(len(x)), None  # D(x) = 1/2 everywhere


class _FakeModule:
    """What the Evaluation callback reads from the LightningModule, for the Triangle data."""

    def __init__(self, data: InMemoryData) -> None:
        data.setup()
        self.data, self.D, self.device = data, _ZeroD(), torch.device("cpu")
        self.g_step, self.max_steps, self.last_logged, self.batch_size = 3, 3, {}, 64
        self.rank, self.world_size = 0, 1  # one process (the callback computes the metrics on rank 0)

    def sample(self, n: int, seed: int, gather: bool = False) -> torch.Tensor:
        return self.data.centers[torch.arange(n) % 3]  # every mode, equally

    def gan_logit(self, out: torch.Tensor) -> torch.Tensor:
        return out


class _TaskModule(_FakeModule):
    def task_metrics(self) -> dict[str, float]:
        return {"ssl/test_error": 0.25}


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, dict(metrics)))


@pytest.mark.parametrize("module_cls", [_FakeModule, _TaskModule])
def test_evaluation_callback_logs_declared_metrics_and_the_task_hook(module_cls):
    module, logger = module_cls(Triangle()), _Recorder()
    trainer = SimpleNamespace(loggers=[logger])
    cb = Evaluation(eval_every=2, n_samples=120)
    cb.on_fit_start(trainer, module)
    cb.on_train_batch_end(trainer, module)  # step 3 of 3: the last step is always evaluated
    [(step, logged)] = logger.calls
    assert step == 3
    assert logged["modes120"] == 3 and logged["eval/D(x_test)"] == logged["eval/D(G(z))"] == 0.5
    assert "eval/seconds" in logged
    assert ("ssl/test_error" in logged) == (module_cls is _TaskModule)
    if module_cls is _TaskModule:
        assert logged["ssl/test_error"] == module.last_logged["ssl/test_error"] == 0.25
    assert cb.seconds > 0
    module.g_step, module.max_steps = 5, 7  # neither due (eval_every=2) nor the last step
    cb.on_train_batch_end(trainer, module)
    assert len(logger.calls) == 1


class CostlyTriangle(Triangle):
    """A protocol too costly to repeat: 300 samples at the end of a run, 120 before."""

    evaluation = EvalSpec(samples=300, interim_samples=120, modes=MixtureModes(), preview="scatter")


def test_interim_evaluations_use_the_declared_count_and_the_last_one_the_protocol():
    module, logger = _FakeModule(CostlyTriangle()), _Recorder()
    trainer = SimpleNamespace(loggers=[logger])
    cb = Evaluation(eval_every=2)
    cb.on_fit_start(trainer, module)
    module.g_step, module.max_steps = 2, 4
    cb.on_train_batch_end(trainer, module)  # due, not the last step: the interim count
    module.g_step = 4
    cb.on_train_batch_end(trainer, module)  # the last step: the protocol
    (step_a, interim), (step_b, final) = logger.calls
    assert (step_a, step_b) == (2, 4)
    assert {"modes120", "reverse_kl120"} <= set(interim) and not any(k.endswith("300") for k in interim)
    assert {"modes300", "reverse_kl300"} <= set(final) and not any(k.endswith("120") for k in final)
    assert "modes300" in module.last_logged and "modes120" not in module.last_logged  # summary.json: the protocol
    assert cb.evaluate(trainer, module)["modes300"] == 3  # a post-hoc evaluation (evaluate.py) is a final one
    assert Evaluation(eval_every=2, n_samples=150).n_samples_for(module, final=False) == 150  # n_samples: both


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n_samples", 0, "metrics.n_samples must be a positive integer (got 0)"),
        ("eval_every", -1, "metrics.eval_every must be a positive integer (got -1)"),
        ("inception_weights", "/nowhere/w.pth", "metrics.inception_weights: no file at /nowhere/w.pth"),
    ],
)
def test_bad_metrics_keys_are_one_line_errors_before_training(tmp_path, key, value, message):
    with pytest.raises(ValueError) as direct:
        Evaluation(**{"eval_every": 1, key: value})
    assert str(direct.value) == message
    with pytest.raises(UserError) as err:
        train(compose_cfg([*TINY, "max_steps=2", f"metrics.{key}={value}"]), tmp_path / "run")
    assert str(err.value) == message and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "summary.json").exists()  # rejected before anything was written


# -- metrics=none ----------------------------------------------------------------------------------------------
def test_metrics_none_is_null_and_a_run_trains_without_evaluation(tmp_path):
    assert isinstance(compose_cfg([]).metrics._target_, str)
    assert any(isinstance(cb, Evaluation) for cb in callbacks(compose_cfg([]), tmp_path))
    cfg = compose_cfg([*TINY, "metrics=none", "max_steps=3"])
    assert cfg.metrics is None
    assert not any(isinstance(cb, Evaluation) for cb in callbacks(cfg, tmp_path))
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["g_steps"] == 3
    assert not [k for k in summary["final"] if k.startswith(("modes", "hq_fraction", "eval/"))]
    assert summary["eval_time_s"] == 0
    assert summary["data"]["preview"] == "scatter"  # the run record says how to show ring8's samples


# -- the report ------------------------------------------------------------------------------------------------
def _run(folder: Path, data: str, seed: int, preview: str | None) -> None:
    folder.mkdir(parents=True)
    summary = {
        "status": "completed",
        "seed": seed,
        "choices": {"data": data, "loss": "minimax"},
        "overrides": [f"data={data}", f"seed={seed}"],
        "final": {"modes2500": 8.0},
    }
    if preview is not None:
        summary["data"] = {"name": data, "preview": preview}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "samples").mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "samples" / "step_0000010.png")


def test_report_reads_the_preview_kind_from_the_run_record(tmp_path):
    from ganlab.report import write_report

    sweep = tmp_path / "sweep"
    _run(sweep / "0", "spiral", 0, "density")  # a name the report has never heard of
    _run(sweep / "1", "spiral", 1, "density")
    _run(sweep / "2", "ring8", 0, None)  # an older run without the record: the name does not make it a scatter
    _run(sweep / "3", "digits", 0, "scatter")  # the record wins over whatever the name suggests
    report = write_report(sweep)
    previews = {name: ds["preview"] for name, ds in report["datasets"].items()}
    assert previews == {"spiral": "density", "ring8": "grid", "digits": "scatter"}
    md = (sweep / "report.md").read_text()
    spiral = md.split("## spiral")[1].split("## ")[0]
    assert "Final p_g against p_data, with D(x)" in spiral and (sweep / "plots" / "spiral" / "samples.png").is_file()
    assert "Final sample grids" in md.split("## ring8")[1].split("## ")[0]
    assert "Final samples, scattered over the real data" in md.split("## digits")[1].split("## ")[0]
