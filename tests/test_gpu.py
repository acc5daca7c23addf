"""The GPU path: bf16 autocast, channels_last, torch.compile, no host syncs in the step, the MD layer on the GPU.

Marked ``cuda`` and skipped without a CUDA device; ``scripts/gpu_check.sh`` runs them (with the benchmark).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ganlab import bench

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(tmp_path: Path, *overrides: str) -> dict:
    from ganlab.pipeline import train

    cfg = bench.compose(["data=digits", "max_steps=30", "log_every=10", "metrics=none", "trainer.accelerator=gpu",
                         *overrides])  # fmt: skip
    return train(cfg, tmp_path / "run")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_pipeline_trains_on_the_gpu(tmp_path: Path, precision: str) -> None:
    summary = _train(tmp_path, f"trainer.precision={precision}")
    assert summary["status"] == "completed" and summary["g_steps"] == 30
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary["final"].items() if k.startswith("loss/"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_channels_last_nets_compute_the_same_function() -> None:
    from ganlab.nets import DCGANDiscriminator, DCGANGenerator

    torch.manual_seed(0)
    G, D = DCGANGenerator((3, 32, 32)).cuda(), DCGANDiscriminator((3, 32, 32)).cuda()
    torch.manual_seed(0)
    Gc = DCGANGenerator((3, 32, 32), channels_last=True).cuda()
    Dc = DCGANDiscriminator((3, 32, 32), channels_last=True).cuda()
    z = torch.randn(16, 64, device="cuda")
    # cuDNN may run float32 convs in TF32 (10-bit mantissa: ~5e-4 apart between the two layouts' algorithms); the
    # same function is compared in full float32
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        torch.testing.assert_close(Gc(z), G(z), atol=1e-4, rtol=1e-4)
        x = G(z)
        torch.testing.assert_close(Dc(x)[0], D(x)[0], atol=1e-4, rtol=1e-4)


def test_compiled_nets_train(tmp_path: Path) -> None:
    summary = _train(tmp_path, "model.compile=true", "model.channels_last=true")
    assert summary["status"] == "completed"


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["loss=minibatch_discrimination"],
        ["loss=feature_matching"],
        ["tricks=[ema,historical_averaging,label_smoothing,virtual_batch_norm]"],
        ["trainer.deterministic=true"],
    ],
    ids=["non_saturating", "minibatch_discrimination", "feature_matching", "tricks", "deterministic"],
)
def test_no_host_sync_in_a_training_step_outside_log_steps(
    tmp_path: Path, overrides: list[str], deterministic_mode_restored: None
) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call (``.item()``, ``bool()``,
    ``float()`` of a device tensor, a non-blocking copy's wait) inside training_step between log steps. DCGAN on
    digits: one step a call (``model.steps_per_call: 1``), so a call between log steps holds no log step."""
    from ganlab.tasks.gan import GANModule
    from ganlab.util import is_due

    original = GANModule.training_step
    checked = []

    def strict_step(self, batch, batch_idx):
        if is_due(self.g_step + 1, self.log_every, self.max_steps) or self.g_step < 2:
            return original(self, batch, batch_idx)  # log steps sync once by design; the first steps allocate
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(self.g_step)

    GANModule.training_step = strict_step
    try:
        _train(tmp_path, "model.steps_per_call=1", *overrides)
    finally:
        GANModule.training_step = original
    assert len(checked) >= 20


def test_the_finiteness_check_before_a_checkpoint_reads_state_on_both_devices() -> None:
    """Adam keeps ``step`` on the CPU beside its moments on the GPU: the check spans both."""
    from ganlab.checkpoint import all_finite

    net = torch.nn.Linear(3, 4).cuda()
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(8, 3, device="cuda")).sum().backward()
    opt.step()
    assert {v.device.type for v in opt.state[net.weight].values()} == {"cpu", "cuda"}
    assert all_finite([net], [opt])
    opt.state[net.weight]["exp_avg"][0, 0] = float("inf")
    assert not all_finite([net], [opt])


def test_minibatch_discrimination_on_the_gpu_matches_the_cpu() -> None:
    from ganlab.tricks.minibatch_discrimination import MinibatchDiscrimination

    torch.manual_seed(0)
    layer = MinibatchDiscrimination(128, n_kernels=100, kernel_dim=5)
    layer.initialised.fill_(True)
    x = torch.randn(256, 128, requires_grad=True)
    layer(x).sum().backward()
    xg = x.detach().cuda().requires_grad_(True)
    layer_g = layer.cuda()
    out = layer_g(xg)
    out.sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), x.grad, atol=1e-3, rtol=1e-3)


def test_benchmark_runs_on_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.device().type == "cuda"
    assert bench.main(["--quick", "--settings", "digits", "--no-eval"]) == 0
    assert "| digits DCGAN b64 |" in capsys.readouterr().out


def test_the_digits_evaluation_on_the_gpu_gives_the_cpu_numbers(tmp_path: Path) -> None:
    """On a GPU, IS, KID and precision/recall take the dense route on the device (``fidelity_from_pass``); from the
    same features (the GPU reference reads the CPU one's cache) they give the CPU route's numbers, and a reference
    computed on the GPU has the k-NN radii the CPU's pruned search finds on its features, and KID's reference
    sums."""
    from ganlab.data import load_digits_uint8
    from ganlab.metrics import fidelity as fm

    train_x, _, test_x, _ = load_digits_uint8()

    def stacked(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return images[torch.randint(len(images), (n * 3,), generator=g), 0].reshape(n, 3, 8, 8)

    real, fake = stacked(train_x, 1500, 1), stacked(test_x, 1000, 3)
    fake[:250] = torch.randint(0, 256, (250, 3, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    refs = {dev: fm.DigitsReference(real, device=dev, cache_dir=tmp_path, cache_key_parts=("few", "train"))
            for dev in ("cpu", "cuda")}  # fmt: skip
    passed = fm.digits_pass(fake, refs["cpu"].net)
    cpu = fm.fidelity_from_pass(passed, refs["cpu"], kid_subset_size=100)
    gpu = fm.fidelity_from_pass(passed, refs["cuda"], kid_subset_size=100)
    assert list(gpu) == list(cpu)
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert 0 < cpu["precision1k"] < 1 and 0 < cpu["recall1k"] < 1
    fresh = fm.DigitsReference(real, device="cuda")  # no cache: features and radii computed with the GPU
    features = fresh.features(1000)
    want = fm.knn_radii(features, bound=fresh.bound())
    torch.testing.assert_close(fresh.radii(1000), want, rtol=1e-12, atol=1e-6)
    sums = fm.KidPlan.draw(1000, fresh.features(1500), 100).real_sums  # numpy, on the CPU
    torch.testing.assert_close(fresh.kid_plan(1000, 100).real_sums, sums, rtol=1e-12, atol=0)


def test_a_deterministic_gpu_run_repeats_bit_for_bit(tmp_path: Path) -> None:
    """``trainer.deterministic=true``: two runs of the same seed (each its own process, as the CLI runs them, so
    the flag and ``CUBLAS_WORKSPACE_CONFIG`` are set before the process first uses the GPU) end with the same weights
    and the same final metrics, evaluation included. Without it the H200 gave fid26k 712.2 and 570.4 for two
    default stacked_digits runs."""
    from conftest import assert_same_training_state, run_cli

    args = ["data=stacked_digits", "max_steps=100", "log_every=50", "metrics.eval_every=100", "logger=csv",
            "metrics.n_samples=2000", "trainer.deterministic=true"]  # fmt: skip
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        proc = run_cli(args, tmp_path / name, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        run = tmp_path / name / "run"
        runs.append((json.loads((run / "summary.json").read_text()), torch.load(run / "checkpoints" / "last.ckpt")))
    (sa, ca), (sb, cb) = runs
    assert sa["final"] == sb["final"] and "fid2k" in sa["final"]
    assert_same_training_state(ca, cb)


def test_a_deterministic_gpu_run_resumed_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """``trainer.deterministic=true`` on a GPU: a run stopped at step 20 and resumed to 40 ends with the weights and
    Adam moments of a run that went to 40 at once (each a CLI process, as the determinism test's runs are)."""
    from conftest import assert_same_training_state, run_cli

    common = ["data=digits", "metrics=none", "logger=csv", "log_every=10", "ckpt_every=20", "seed=3",
              "model.lr_decay=none", "trainer.deterministic=true"]  # fmt: skip
    for name, args in (
        ("full", ["max_steps=40"]),
        ("first", ["max_steps=20"]),
        ("second", ["max_steps=40", f"resume={tmp_path / 'first' / 'run'}"]),
    ):
        (tmp_path / name).mkdir()
        proc = run_cli([*common, *args], tmp_path / name, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "second" / "run" / "summary.json").read_text())
    assert summary["g_steps"] == 40 and summary["resumed_from"].endswith("last.ckpt")
    a, b = (
        torch.load(tmp_path / n / "run" / "checkpoints" / "last.ckpt", weights_only=False) for n in ("full", "second")
    )
    assert_same_training_state(a, b)
