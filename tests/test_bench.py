"""The benchmark command (python -m ganlab.bench): both loops do the same work, and the table prints.

No speed is asserted here (a timed test fails on a busy machine); the figures are the benchmark's output.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ganlab import bench


@pytest.mark.parametrize("d_steps", [1, 2])
def test_plain_loop_and_pipeline_take_the_same_optimizer_steps(tmp_path: Path, d_steps: int) -> None:
    cfg = bench.compose(["data=ring8", "model=mlp", "metrics=none", f"d_steps={d_steps}"])
    steps = 6
    _, module = bench.pipeline_run(cfg, steps, 1, tmp_path)
    assert (module.d_updates, module.g_step) == (d_steps * steps, steps)
    loop = bench.PlainLoop(
        module.G, module.D, module.data, batch_size=module.batch_size, d_steps=d_steps,
        z_dim=module.z_dim, optim_g=module.optim_g, optim_d=module.optim_d,
    )  # fmt: skip
    for _ in range(steps):
        loop.step()
    n_d, n_g = loop.n_d, loop.n_g
    assert (n_d, n_g) == (module.d_updates, module.g_step)


def test_plain_loop_updates_only_the_player_it_steps() -> None:
    from ganlab.pipeline import build

    module = build(bench.compose(["data=ring8", "model=mlp", "metrics=none"]))
    G, D = module.G, module.D
    before_g = [p.detach().clone() for p in G.parameters()]
    bench.PlainLoop(G, D, module.data, batch_size=8, d_steps=1, z_dim=module.z_dim,
                    optim_g=module.optim_g, optim_d=module.optim_d).step()  # fmt: skip
    assert any(not torch.equal(a, b) for a, b in zip(before_g, G.parameters()))
    assert all(p.requires_grad for p in D.parameters())  # D is unfrozen again after the G update


def test_steady_rate_skips_warmup_and_the_last_step() -> None:
    times = [0.0, 5.0, 6.0, 7.0, 8.0, 100.0]  # a slow first step and a slow (saving) last step
    assert bench.steady_rate(times, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bench.steady_rate(times[:3], 1)
    # one clock reading per training_step call of several generator steps (model.steps_per_call): from the first
    # reading past the warm-up (3 steps at 5 s) to the last-but-one (7 steps at 7 s)
    assert bench.steady_rate([0.0, 5.0, 6.0, 7.0, 100.0], 1, steps=[1, 3, 5, 7, 8]) == pytest.approx(2.0)


def test_synthetic_images_are_32x32_rgb_uint8() -> None:
    data = bench.SyntheticImages(n=16)
    data.setup()
    assert data.train_x.shape == (16, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.shape == (3, 32, 32)


def test_the_table_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--rounds", "1", "--settings", "ring8", "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "| setting | pipeline G steps/s | plain loop G steps/s | ratio |" in out
    assert "| ring8 MLP b256 |" in out
    assert "| B=100, C=5 |" in out and "| B=10, C=3 |" in out  # the mlp model's minibatch sizes
    assert "minibatch_discrimination" in out and "wall-time ratio" in out  # the MD arm against the NS arm
    assert "Intel" in out or "AMD" in out or "cores" in out  # the machine line


def test_an_unknown_setting_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--settings", "ring8,ring9"])
    assert info.value.code == 2 and "unknown setting(s) ring9" in capsys.readouterr().err


def test_evaluation_share_counts_every_due_step() -> None:
    assert bench._evals_in_run(2000, 1000) == 2
    assert bench._evals_in_run(2000, 300) == 7  # 300, ..., 1800 and the last step


def test_evaluation_share_times_the_interim_protocol_before_the_last_evaluation(monkeypatch, tmp_path: Path) -> None:
    # a data set whose evaluations before the last one use fewer samples (as stacked_digits: 2,000, then 26,000);
    # the module is evaluated on the benchmark's device (the H200 once timed a CPU evaluation: Lightning's teardown
    # leaves the module on the CPU), here the meta device standing in for a GPU
    clock = [0.0]
    seen: list[torch.device] = []

    class Callback:
        every = 1000

        def on_fit_start(self, trainer, module) -> None:
            pass

        def n_samples_for(self, module, final: bool = True) -> int:
            return 26_000 if final else 2_000

        def evaluate(self, trainer, module, final: bool = True) -> dict:
            seen.append(module.device)
            clock[0] += 10.0 if final else 1.0  # seconds of the fake clock
            return {}

    import ganlab.pipeline

    monkeypatch.setattr(ganlab.pipeline, "metrics_callback", lambda cfg: Callback())
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench, "device", lambda: torch.device("meta"))
    cost = bench.eval_cost("ring8", 10, None, tmp_path, rate=100.0)  # default run: 2,000 steps, evaluations at 1k, 2k
    assert cost.seconds == 10.0 and cost.evals == 2 and {d.type for d in seen} == {"meta"}
    assert cost.share == pytest.approx((10.0 + 1.0) / (2000 / 100.0 + 11.0))  # one interim, one final evaluation


@pytest.mark.slow
def test_quick_benchmark_finishes_within_a_minute() -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ganlab.bench", "--quick"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| digits |" in proc.stdout and "share of default run" in proc.stdout
    assert time.perf_counter() - t0 < 60  # on an idle 2-core machine


def test_the_shared_table_gives_each_child_the_variant_env_and_its_neighbour(monkeypatch) -> None:
    # fake children: the rate a thread setting would get, halved beside the busy process for 2 threads; a
    # governed auto run ends on 1 thread once a neighbour came, started first or later
    calls: list[tuple[dict[str, str], bool]] = []
    hogs: list[object] = []

    class Hog:
        def __init__(self, cmd: list[str]) -> None:
            hogs.append(self)
            self.alive = True

        def kill(self) -> None:
            self.alive = False

        def wait(self) -> None:
            pass

    def child(cmd, env, **kwargs):
        busy = any(h.alive for h in hogs)
        later = env.get("GANLAB_BENCH_LATER") == "1"
        calls.append((env, busy))
        assert "OMP_NUM_THREADS" not in env  # auto must measure, not read the parent's setting
        governed = env.get("GANLAB_BENCH_GOVERN") != "0"
        n = {"2": 2, "1": 1, "auto": 1 if busy or (later and governed) else 2}[env["GANLAB_BENCH_THREADS"]]
        rate = {2: 5.0 if busy or later else 10.0, 1: 8.0}[n]
        return subprocess.CompletedProcess(cmd, 0, stdout=f"noise\nRATE {rate} {n}\n", stderr="")

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the parent's policy must not reach the variants
    monkeypatch.setattr(bench.subprocess, "Popen", Hog)
    monkeypatch.setattr(bench.subprocess, "run", child)
    rows = {row.name: row for row in bench.shared_rates(10, rounds=1)}
    assert rows[bench.AUTO_VARIANT] == bench.Shared(bench.AUTO_VARIANT, 10.0, 8.0, 8.0, "2/1/1")
    assert rows[bench.BEFORE_VARIANT] == bench.Shared(bench.BEFORE_VARIANT, 10.0, 8.0, 5.0, "2/1/2")
    # per setting: alone, beside a neighbour started first (busy here), then one the child starts itself
    assert [busy for _, busy in calls] == [False, True, False] * len(bench.SHARED_VARIANTS)
    assert [env.get("GANLAB_BENCH_LATER") for env, _ in calls[:3]] == [None, None, "1"]
    assert all(not h.alive for h in hogs)  # every busy neighbour is killed
    by_variant = {name: calls[3 * i][0] for i, name in enumerate(bench.SHARED_VARIANTS)}
    assert by_variant[bench.BEFORE_VARIANT]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in by_variant[bench.AUTO_VARIANT]  # the governed default spins
    # two rounds: the settings take turns within each round, so a drift of the machine hits them alike
    calls.clear()
    bench.shared_rates(10, rounds=2)
    order = [env["GANLAB_BENCH_THREADS"] + env.get("GANLAB_BENCH_GOVERN", "") for env, busy in calls if not busy]
    order = order[::2]  # alone and later are both without a neighbour at the start
    assert order == order[: len(bench.SHARED_VARIANTS)] * 2 and len(set(order)) == len(bench.SHARED_VARIANTS)


def test_the_shared_verdict_measures_auto_alone_against_torchs_default_threads() -> None:
    # issue 12's "alone it loses <= 10 %" is against torch's own default threads (38.9 G steps/s when filed), not
    # against the default before the governor
    shared = [
        bench.Shared(bench.TORCH_DEFAULT_VARIANT, 20.0, 5.0, 6.0, "2/2/2"),
        bench.Shared("1 thread", 14.0, 13.0, 13.5, "1/1/1"),
        bench.Shared(bench.BEFORE_VARIANT, 16.0, 8.0, 9.6, "2/1/2"),
        bench.Shared(bench.AUTO_VARIANT, 17.0, 12.75, 11.9, "2/1/1"),
    ]
    line = bench.shared_verdict(shared)
    assert "auto keeps 75 % of its alone speed" in line and "before the governor: 50 %" in line
    assert "and 70 % with one that starts later (before: 60 %)" in line
    assert "85 % of torch's default threads' rate (goal >= 90 %)" in line
    assert "106 % of the rate before the governor" in line
    assert set(bench.SHARED_VARIANTS) == {row.name for row in shared}


def test_auto_is_resolved_once_so_pipeline_and_plain_loop_share_a_count(monkeypatch) -> None:
    from ganlab import threads

    counts = iter([1, 2, 2, 1])
    monkeypatch.setattr(threads, "auto_threads", lambda probe_s=0.0: next(counts))
    bench._auto_threads.cache_clear()
    before = torch.get_num_threads()
    try:
        cfg = bench.compose(["data=digits"])
        assert cfg.model.threads == "auto"
        seen = []
        for _ in range(3):
            bench.set_threads(cfg)
            seen.append(torch.get_num_threads())
    finally:
        bench._auto_threads.cache_clear()
        torch.set_num_threads(before)
    assert seen == [1, 1, 1]


def test_paired_blocks_interleave_equal_plain_steps_after_the_warm_up_and_before_the_last_step(tmp_path: Path) -> None:
    cfg = bench.compose(["data=ring8", "model=mlp", "metrics=none", "batch_size=16"])
    paired = bench._paired_blocks(block=2, warmup=4)
    module = bench.fit(cfg, 12, tmp_path, paired)
    # blocks end at generator steps 2, 4, 6, 8, 10 (12 is the last step: it saves and samples); 2, 4: warm-up
    assert module.g_step == 12 and paired.plain.n_g == 5 * 2 and paired.plain.n_d == 5 * 2 * module.schedule.count("D")
    # per block: pipeline seconds, plain seconds, and the part of the pipeline's seconds inside training_step
    assert len(paired.pairs) == 3 and all(0 < inside < pipe and plain > 0 for pipe, plain, inside in paired.pairs)
    assert "training_step" not in module.__dict__  # the step's timer is gone after the run
    speed, _ = bench.compare("ring8 MLP b256", ["data=ring8", "model=mlp", "metrics=none"], 12, 1, tmp_path, block=2)
    assert speed.ratio == pytest.approx(speed.pipeline / speed.plain)  # one round: the rates of the same steps
    assert speed.step_ratio > speed.ratio and speed.outside_ms > 0  # the step alone is closer to the plain loop
    assert speed.ratio_low <= speed.ratio <= speed.ratio_high  # the interval over the blocks holds the ratio


def test_the_ratio_interval_is_the_spread_of_the_block_ratio_over_resampled_blocks() -> None:
    # plain always 0.9x the pipeline's seconds: every resample gives 0.9
    assert bench.ratio_interval([(t, 0.9 * t) for t in (1.0, 2.0, 3.0)]) == pytest.approx((0.9, 0.9))
    g = torch.Generator().manual_seed(0)
    pipe = 1 + torch.rand(400, generator=g, dtype=torch.float64)
    plain = pipe * (0.95 + 0.1 * torch.rand(400, generator=g, dtype=torch.float64))  # block ratios 0.95-1.05
    low, high = bench.ratio_interval(list(zip(pipe[:25].tolist(), plain[:25].tolist(), strict=True)))
    low4, high4 = bench.ratio_interval(list(zip(pipe.tolist(), plain.tolist(), strict=True)))
    whole = float(plain.sum() / pipe.sum())
    assert 0.95 < low < whole < high < 1.05 and low4 < whole < high4
    assert (high4 - low4) < 0.5 * (high - low)  # 16x the blocks: about a quarter of the width
    # the same blocks, the same interval (a seeded resampling); the order of the pair matters
    assert bench.ratio_interval(list(zip(pipe.tolist(), plain.tolist(), strict=True))) == (low4, high4)
    assert bench.ratio_interval([(0.9 * t, t) for t in (1.0, 2.0)]) == pytest.approx((1 / 0.9, 1 / 0.9))
    assert all(math.isnan(v) for v in bench.ratio_interval([(1.0, 0.9)]))  # one block: no spread to show
