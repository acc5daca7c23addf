"""The speed of the pipeline, measured: ``python -m ganlab.bench`` (``--quick`` for a short version).

Prints one table, every figure measured in this run:

- **steps/s**: steady-state generator steps per second of the pipeline (the real
  :class:`~ganlab.tasks.gan.GANModule` built by :func:`ganlab.pipeline.build` and driven by a Lightning Trainer with
  the pipeline's settings, callbacks and CSV logger) and of a plain PyTorch loop (:class:`PlainLoop`: the same nets,
  data, batch and Adam settings; k D updates on fresh batches, then one G update), interleaved in one process: after
  every block of pipeline steps the same number of plain steps runs inside the pipeline's run (:func:`compare`), so
  both halves of every pair see the same seconds of the machine. The ratio is plain seconds over pipeline seconds
  for the same steps, per run; the median over the runs. (Run in turn, a minute apart, the two loops' rates drifted
  by 1.5x on this shared VM, and one commit's ring8 ratio came out at 0.80-0.82 in some processes and 0.99-1.12 in
  others; paired, it repeats at 0.82-0.85.) Beside it, a 90 % bootstrap interval of the ratio over the paired blocks
  of all the runs (:func:`ratio_interval`): a gap narrower than it is not shown by the run. Two more columns split
  the pipeline's seconds (CPU only): the plain loop against the time inside ``training_step`` alone (the GAN step
  the module runs) and the milliseconds a step spent around it (Lightning's loop, the callbacks, previews and
  checkpoints), a fixed cost that weighs most on the smallest step.
- **GFLOP/s** of the 32x32 DCGAN step (``torch.utils.flop_counter``) beside this machine's float32 matmul rate
  (a 2048x2048 sgemm) measured in the same run.
- **evaluation**: one evaluation's seconds and its share of a default run (``max_steps`` generator steps at the
  measured step rate plus an evaluation every ``metrics.eval_every`` steps and at the end) per built-in data set.
- **minibatch discrimination**: the layer's forward+backward at n = 256, A = 128 on one thread, and the ring8 run's
  steps/s of that arm against the non-saturating arm's at the defaults.
- **options** (``--options``): ``channels_last``, ``bf16-mixed`` and ``torch.compile`` on the 32x32 DCGAN step,
  each where it runs at all.
- **shared CPU** (``--shared``): the default digits run's steps/s alone, beside one CPU-bound process that was there
  first, and with one that starts at 40 % of the run (timed from 60 %), per thread setting (child processes, since
  OpenMP reads its environment once).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ganlab import threads
from ganlab.data.base import EvalSpec, InMemoryData

BUILTIN_DATA = ("digits", "stacked_digits", "ring8", "grid25")


class SyntheticImages(InMemoryData):
    """``uint8 [n, 3, 32, 32]`` smooth random images, generated in memory (the benchmark's 32x32 setting)."""

    name = "synthetic32"
    kind = "image"
    evaluation = EvalSpec()  # no metrics

    def __init__(self, n: int = 2048, resolution: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.n, self.resolution, self.seed = n, resolution, seed

    def load(self) -> tuple[Tensor, None, Tensor, None]:
        g = torch.Generator().manual_seed(self.seed)
        low = torch.rand(self.n + 64, 3, 8, 8, generator=g)  # upsampled noise: image-like local correlation
        x = F.interpolate(low, size=self.resolution, mode="bilinear", align_corners=False)
        x = (x * 255).round().to(torch.uint8)
        return x[: self.n], None, x[self.n :], None


# the benchmark's settings: name -> config overrides (the mlp model's settings on ring8; batch 64 for the images)
SETTINGS: dict[str, list[str]] = {
    "ring8 MLP b256": ["data=ring8", "model=mlp", "metrics=none"],
    "digits DCGAN b64": ["data=digits", "metrics=none"],
    "32x32 DCGAN b64": ["data=digits", "data._target_=ganlab.bench.SyntheticImages", "metrics=none"],
}


def compose(overrides: Sequence[str] = ()) -> Any:
    """The run config ``python src/train.py <overrides>`` would get (CSV logger, no W&B)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ganlab.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=["logger=csv", *overrides])


@functools.cache
def _auto_threads() -> int:
    """``auto`` resolved once per process: the pipeline and the plain loop it is compared with get the same count,
    and the 0.25 s look at the cores is not repeated at every timed run."""
    return threads.auto_threads()


def set_threads(cfg: Any) -> None:
    """What the pipeline does with ``model.threads`` (see :mod:`ganlab.threads`), ``auto`` decided once."""
    setting = cfg.model.get("threads")
    if setting is None:
        setting = os.cpu_count() or 1
    elif str(setting) == "auto":
        setting = _auto_threads()
    threads.apply(setting)


# -- the two loops ------------------------------------------------------------------------------------------------
def busy_process() -> subprocess.Popen:
    """One CPU-bound process (``while True: pass``), the neighbour of the shared-machine table."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _timer_callback(neighbour_at: int | None = None) -> Any:
    """A callback that reads the clock after each ``training_step`` call; with ``neighbour_at``, it also starts a
    :func:`busy_process` once that many generator steps are done (``neighbour``: the caller ends it)."""
    import pytorch_lightning as pl

    class StepTimes(pl.Callback):
        step_cadence = (neighbour_at,) if neighbour_at else ()  # clock after any call; a call ends at neighbour_at

        def __init__(self) -> None:
            self.times: list[float] = []  # after each call
            self.steps: list[int] = []  # the generator steps completed by then
            self.neighbour: subprocess.Popen | None = None

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            self.times.append(_now())
            self.steps.append(module.g_step)
            if neighbour_at and self.neighbour is None and module.g_step >= neighbour_at:
                self.neighbour = busy_process()

    return StepTimes()


def steady_rate(times: Sequence[float], warmup: int, steps: Sequence[int] | None = None) -> float:
    """Steps per second from step ``warmup`` to the last-but-one clock reading (the last one saves and samples).
    ``times[i]``: the clock after ``steps[i]`` steps (default: after each step, ``steps[i] = i + 1``)."""
    steps = range(1, len(times) + 1) if steps is None else steps
    end = len(times) - 2
    start = next((i for i, s in enumerate(steps) if s >= warmup + 1), end)
    if end <= start:
        raise ValueError(f"need more than {warmup + 2} steps to measure (got {len(times)} clock readings)")
    return (steps[end] - steps[start]) / (times[end] - times[start])


def fit(cfg: Any, steps: int, workdir: Path, instrument: Any, govern: bool = False) -> Any:
    """Train the pipeline for ``steps`` generator steps with one ``instrument`` callback after its own (a step
    timer or the paired plain loop: a second one would cost the pipeline a hook call per Lightning hook); the
    trained module. ``model.threads=auto`` is decided once (:func:`set_threads`) and, unless ``govern``, not
    watched during the run: the plain loop it is compared with runs on the same count."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from ganlab.pipeline import build, callbacks, make_trainer
    from ganlab.tracking import make_loggers

    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.max_steps = steps
    set_threads(cfg)
    if not govern and str(cfg.model.get("threads")) == "auto":
        cfg.model.threads = torch.get_num_threads()  # no ThreadGovernor among the callbacks
    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    module = build(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    loggers = make_loggers(cfg.logger, workdir, {})
    trainer = make_trainer(cfg, module, workdir, loggers, [*callbacks(cfg, workdir), instrument])
    with contextlib.redirect_stdout(io.StringIO()):  # the pipeline's progress lines
        trainer.fit(module)
    return module


def pipeline_run(
    cfg: Any, steps: int, warmup: int, workdir: Path, govern: bool = False, timer: Any = None
) -> tuple[float, Any]:
    """Steady steps/s of the pipeline alone for ``steps`` generator steps, and the trained module (``govern``:
    see :func:`fit`; ``timer``: a :func:`_timer_callback` or one like it)."""
    timer = timer or _timer_callback()
    module = fit(cfg, steps, workdir, timer, govern)
    return steady_rate(timer.times, warmup, timer.steps), module


class PlainLoop:
    """A plain PyTorch GAN loop (non-saturating loss), one generator step per :meth:`step`: ``d_steps`` D updates
    on fresh real and noise batches, then one G update with D frozen. ``n_d``, ``n_g`` count optimizer steps."""

    def __init__(
        self,
        G: torch.nn.Module,
        D: torch.nn.Module,
        data: InMemoryData,
        *,
        batch_size: int,
        d_steps: int,
        z_dim: int,
        optim_g: dict[str, Any],
        optim_d: dict[str, Any],
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.G, self.D = G.to(device).requires_grad_(True), D.to(device).requires_grad_(True)
        self.opt_g = torch.optim.Adam(G.parameters(), lr=optim_g["lr"], betas=tuple(optim_g["betas"]))
        self.opt_d = torch.optim.Adam(D.parameters(), lr=optim_d["lr"], betas=tuple(optim_d["betas"]))
        self.data, self.pool, self.m = data, data.train_x.to(device), batch_size
        self.d_steps, self.z_dim, self.device = d_steps, z_dim, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.ones, self.zeros = torch.ones(batch_size, device=device), torch.zeros(batch_size, device=device)
        self.n_d = self.n_g = 0

    @classmethod
    def like(
        cls,
        module: Any,
        device: str | torch.device = "cpu",
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> PlainLoop:
        """A plain loop on copies of ``module``'s nets, with its data, batch size, k and Adam settings; ``wrap``
        (``channels_last``, ``torch.compile``) is applied to each copy before the loop is built."""
        G, D = copy.deepcopy(module.G).train(), copy.deepcopy(module.D).train()
        if wrap is not None:
            G, D = wrap(G), wrap(D)
        return cls(
            G,
            D,
            module.data,
            batch_size=module.batch_size,
            d_steps=module.schedule.count("D"),
            z_dim=module.z_dim,
            optim_g=module.optim_g,
            optim_d=module.optim_d,
            device=device,
        )

    def _noise(self) -> Tensor:
        return torch.randn(self.m, self.z_dim, generator=self.gen, device=self.device)

    def step(self) -> None:
        G, D, m = self.G, self.D, self.m
        for _ in range(self.d_steps):
            idx = torch.randint(len(self.pool), (m,), generator=self.gen, device=self.device)
            real = self.data.to_model(self.pool[idx])
            with torch.no_grad():
                fake = G(self._noise())
            loss = F.binary_cross_entropy_with_logits(D(real)[0], self.ones) + F.binary_cross_entropy_with_logits(
                D(fake)[0], self.zeros
            )
            self.opt_d.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_d.step()
            self.n_d += 1
        D.requires_grad_(False)
        loss = F.binary_cross_entropy_with_logits(D(G(self._noise()))[0], self.ones)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        D.requires_grad_(True)
        self.n_g += 1


def device() -> torch.device:
    """Where both loops run: the GPU when there is one (the pipeline's ``trainer.accelerator=auto``)."""
    return torch.device("cuda" if _cuda() else "cpu")


def _loop_rate(loop: PlainLoop, steps: int, warmup: int) -> float:
    """Steady steps/s of ``loop`` run alone for ``steps`` steps (each timed after the device finished it)."""
    times: list[float] = []
    for _ in range(steps):
        loop.step()
        times.append(_now())
    return steady_rate(times, warmup)


def plain_rate(module: Any, cfg: Any, steps: int, warmup: int) -> float:
    """Steady steps/s of :class:`PlainLoop` alone, on fresh copies of ``module``'s nets."""
    set_threads(cfg)
    return _loop_rate(PlainLoop.like(module, device()), steps, warmup)


def _paired_blocks(block: int, warmup: int) -> Any:
    """A callback that runs the plain loop *inside* the pipeline's run: after every ``block`` pipeline steps,
    ``block`` :class:`PlainLoop` steps on copies of the module's initial nets. ``pairs`` holds (pipeline seconds,
    plain seconds, seconds inside the pipeline's ``training_step``) per block, from the first block that ends after
    ``warmup`` to the last one before the final step (which saves and samples). Both halves of a pair see the same
    seconds of a noisy machine, so their ratio holds where rates measured a minute apart do not (on this shared VM
    they drift by 1.5x within minutes).

    The time inside ``training_step`` splits the pipeline's seconds into the GAN step itself and what runs around
    it (Lightning's loop, the callbacks, previews and checkpoints). It is taken on the CPU only (NaN on a GPU,
    where timing each step would need a device sync that changes what is timed)."""
    import pytorch_lightning as pl

    class PairedBlocks(pl.Callback):
        step_cadence = (block,)  # a training_step call (model.steps_per_call) never runs past a block's end

        def __init__(self) -> None:
            self.pairs: list[tuple[float, float, float]] = []
            self.plain: PlainLoop | None = None
            self.mark = self.inside = 0.0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.plain = PlainLoop.like(module, device())
            if not _cuda():
                step = module.training_step  # the bound method; restored at the end

                # wraps: Lightning's per-step signature check follows __wrapped__ to the module's own (cached)
                # signature, so the timed pipeline pays what an untimed one does
                @functools.wraps(step)
                def timed(*args: Any, **kwargs: Any) -> Any:
                    t0 = time.perf_counter()
                    out = step(*args, **kwargs)
                    self.inside += time.perf_counter() - t0
                    return out

                module.training_step = timed
            else:
                self.inside = float("nan")
            self.mark = _now()

        def on_train_end(self, trainer: Any, module: Any) -> None:
            module.__dict__.pop("training_step", None)

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if module.g_step % block or module.g_step >= module.max_steps:
                return
            assert self.plain is not None
            t_pipe = _now()
            for _ in range(block):
                self.plain.step()
            t_plain = _now()
            if module.g_step > warmup:
                self.pairs.append((t_pipe - self.mark, t_plain - t_pipe, self.inside))
            if not math.isnan(self.inside):  # NaN on a GPU: not timed
                self.inside = 0.0
            self.mark = _now()

    return PairedBlocks()


@functools.cache
def _cuda() -> bool:
    return torch.cuda.is_available()  # asked once per process, not at every timed step


def _now() -> float:
    """The time after the device finished its queued work."""
    if _cuda():
        torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Speed:
    """One setting's paired figures (medians over the rounds). ``step_ratio``: plain seconds over the seconds
    inside the pipeline's ``training_step`` (the GAN step alone); ``outside_ms``: the pipeline's milliseconds a
    step around it (Lightning's loop, callbacks, previews, checkpoints). Both NaN on a GPU. ``ratio_low``,
    ``ratio_high``: the ratio's :func:`ratio_interval` over every paired block of every round."""

    setting: str
    pipeline: float
    plain: float
    ratio: float
    step_ratio: float = float("nan")
    outside_ms: float = float("nan")
    ratio_low: float = float("nan")
    ratio_high: float = float("nan")


def ratio_interval(
    pairs: Sequence[tuple[float, float]], level: float = 0.9, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """How far the ratio of summed plain seconds to summed pipeline seconds moves with which blocks were timed:
    the central ``level`` of its values over ``resamples`` bootstrap resamples of the ``(pipeline s, plain s)``
    blocks (with replacement; a seeded generator, so the same blocks give the same interval). A gap between the
    loops smaller than this spread is not shown by the run."""
    t = torch.tensor(pairs, dtype=torch.float64).reshape(-1, 2)
    if len(t) < 2:
        return float("nan"), float("nan")
    idx = torch.randint(len(t), (resamples, len(t)), generator=torch.Generator().manual_seed(seed))
    ratios = t[idx, 1].sum(1) / t[idx, 0].sum(1)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(ratios, tails).tolist()
    return low, high


def compare(
    name: str, overrides: Sequence[str], steps: int, rounds: int, workdir: Path, block: int | None = None
) -> tuple[Speed, Any]:
    """Pipeline and plain loop interleaved in blocks of ``block`` steps (default: ~40 blocks a run), ``rounds``
    runs. Per round: each loop's steps/s over the paired blocks, and their ratio (the same steps on each side,
    so the ratio of their summed seconds), the step-alone ratio and the time around the step; the medians over
    the rounds."""
    cfg = compose(overrides)
    warmup = max(2, steps // 5)
    block = block or max(1, steps // 40)
    if steps - warmup < 2 * block:
        raise ValueError(f"{name}: {steps} steps leave fewer than 2 blocks of {block} after {warmup} warm-up steps")
    rows: list[tuple[float, float, float, float, float]] = []
    blocks: list[tuple[float, float]] = []
    module = None
    for r in range(rounds):
        paired = _paired_blocks(block, warmup)
        module = fit(cfg, steps, workdir / f"{name.split()[0]}_{r}", paired)
        t_pipe, t_plain, t_inside = (sum(t) for t in zip(*paired.pairs, strict=True))
        n = block * len(paired.pairs)
        rows.append((n / t_pipe, n / t_plain, t_plain / t_pipe, t_plain / t_inside, 1e3 * (t_pipe - t_inside) / n))
        blocks += [(pipe, plain) for pipe, plain, _ in paired.pairs]
    medians = [statistics.median(column) for column in zip(*rows, strict=True)]
    return Speed(name, *medians, *ratio_interval(blocks)), (cfg, module)


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """float32 ``n x n`` matmul rate (GFLOP/s), best of ``reps``."""
    a, b = torch.randn(n, n, device=device()), torch.randn(n, n, device=device())
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = _now()
        a @ b
        best = min(best, _now() - t0)
    return 2 * n**3 / best / 1e9


def step_gflop(module: Any) -> float:
    """FLOP of one generator step of :class:`PlainLoop` (k D updates + one G update) on ``module``'s nets."""
    from torch.utils.flop_counter import FlopCounterMode

    loop = PlainLoop.like(module)
    with FlopCounterMode(display=False) as counter:
        loop.step()
    return counter.get_total_flops() / 1e9


# -- evaluation ---------------------------------------------------------------------------------------------------
@dataclass
class EvalCost:
    data: str
    n_samples: int
    seconds: float
    steps_per_s: float
    evals: int
    share: float


@contextlib.contextmanager
def _threads(n: int) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def md_arm_rates(steps: int, rounds: int, workdir: Path) -> tuple[float, float]:
    """Pipeline G steps/s on ring8 at the defaults of the non-saturating and the minibatch-discrimination arms
    (medians of ``rounds``, alternated so drifting load hits both alike)."""
    ns, md = [], []
    for i in range(rounds):
        for arm, out in (("non_saturating", ns), ("minibatch_discrimination", md)):
            cfg = compose(["data=ring8", f"loss={arm}", "metrics=none", "logger=csv"])
            out.append(pipeline_run(cfg, steps, max(2, steps // 5), workdir / f"{arm}{i}")[0])
    return statistics.median(ns), statistics.median(md)


def _evals_in_run(max_steps: int, every: int) -> int:
    from ganlab.util import is_due

    return sum(1 for s in range(1, max_steps + 1) if is_due(s, every, max_steps))


def eval_cost(data: str, steps: int, n_samples: int | None, workdir: Path, rate: float | None = None) -> EvalCost:
    """One evaluation's seconds (the second one: the reference statistics are cached after the first) and its share
    of a default run of ``max_steps`` generator steps at the pipeline's measured steady rate."""
    from ganlab.pipeline import metrics_callback

    overrides = [f"data={data}"] + ([f"metrics.n_samples={n_samples}"] if n_samples else [])
    cfg = compose(overrides)
    if rate is None:
        rate, module = pipeline_run(cfg, steps, max(2, steps // 5), workdir / f"eval_{data}")
    else:
        from ganlab.pipeline import build

        set_threads(cfg)
        module = build(cfg)
    module.to(device())  # a run evaluates where it trains (Lightning's teardown leaves the module on the CPU)
    callback = metrics_callback(cfg)
    callback.on_fit_start(None, module)

    no_loggers = SimpleNamespace(loggers=[])  # what evaluate() reads of the trainer

    def timed(final: bool) -> float:
        callback.evaluate(no_loggers, module, final=final)  # warm: reference statistics cached after this
        t0 = time.perf_counter()
        callback.evaluate(no_loggers, module, final=final)
        return time.perf_counter() - t0

    with torch.no_grad():
        seconds = timed(final=True)
        # the evaluations before the last one run the data set's interim protocol where it has one (stacked sets)
        interim = seconds if callback.n_samples_for(module, False) == callback.n_samples_for(module) else timed(False)
    evals = _evals_in_run(cfg.max_steps, callback.every)
    total_eval = seconds + (evals - 1) * interim
    share = total_eval / (cfg.max_steps / rate + total_eval)
    return EvalCost(data, callback.n_samples_for(module), seconds, rate, evals, share)


# -- minibatch discrimination -------------------------------------------------------------------------------------
def md_ms(n: int, a: int, b: int, c: int, reps: int = 5) -> tuple[float, float]:
    """Forward+backward ms of the minibatch-discrimination layer on ``[n, a]`` features: the median and the best
    of ``reps`` (after one warm-up). The code is deterministic, so a slower repetition is the machine's noise; the
    best is the lower bound ``timeit`` recommends, the median what a run beside that noise sees."""
    from ganlab.tricks.minibatch_discrimination import MinibatchDiscrimination

    layer = MinibatchDiscrimination(a, n_kernels=b, kernel_dim=c)
    layer.initialised.fill_(True)
    x = torch.randn(n, a, requires_grad=True)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        layer(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:]), 1000 * min(times[1:])


# -- GPU-path options on the 32x32 step ---------------------------------------------------------------------------
def option_rates(module: Any, steps: int) -> dict[str, str]:
    """Plain-loop steps/s of the 32x32 DCGAN under each GPU-path option, on this machine's device."""
    from ganlab.nets.dcgan import to_channels_last

    out: dict[str, str] = {}

    def run(ctx: Any = None, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> float:
        loop = PlainLoop.like(module, device(), wrap)
        with ctx or nullcontext():
            return _loop_rate(loop, steps, 1)

    def channels_last(net: torch.nn.Module) -> torch.nn.Module:
        net.channels_last = True  # activations too (the nets' model.channels_last flag)
        return to_channels_last(net)

    out["fp32"] = f"{run():.3g}"
    out["channels_last"] = f"{run(wrap=channels_last):.3g}"
    try:
        out["bf16 autocast"] = f"{run(torch.autocast(device().type, dtype=torch.bfloat16)):.3g}"
    except Exception as exc:  # an op without a bf16 kernel on this CPU
        out["bf16 autocast"] = f"fails: {type(exc).__name__}"
    try:
        t0 = time.perf_counter()
        rate = run(wrap=torch.compile)
        out["torch.compile"] = f"{rate:.3g} (incl. compile {time.perf_counter() - t0:.0f} s)"
    except Exception as exc:  # no C++ compiler, or an unsupported op
        out["torch.compile"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    return out


# -- shared CPU ---------------------------------------------------------------------------------------------------
TORCH_DEFAULT_VARIANT = "2 threads (torch's own default: OpenMP threads spin)"  # issue 12's baseline (38.9 G steps/s)
BEFORE_VARIANT = "auto at the start only, OMP_WAIT_POLICY=PASSIVE (the default before the governor)"
AUTO_VARIANT = "auto, watched by the governor, threads spin (the default)"
SHARED_VARIANTS: dict[str, dict[str, str]] = {
    TORCH_DEFAULT_VARIANT: {"GANLAB_BENCH_THREADS": "2"},
    "1 thread": {"GANLAB_BENCH_THREADS": "1"},
    BEFORE_VARIANT: {"GANLAB_BENCH_THREADS": "auto", "GANLAB_BENCH_GOVERN": "0", "OMP_WAIT_POLICY": "PASSIVE"},
    AUTO_VARIANT: {"GANLAB_BENCH_THREADS": "auto"},
}
# where the run meets a CPU-bound process: none, one that was there first, one that starts at 40 % of the run
SCENARIOS = ("alone", "beside", "later")
LATER_AT, LATER_FROM = 0.4, 0.6  # the later neighbour starts at this fraction of the steps; timed from the second
_OMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")  # the variants set these; the parent's would change what they mean


def _child_rate(steps: int) -> None:
    """Child process: the default digits pipeline's steady steps/s, printed as ``RATE <x> <threads at the end>``.
    ``GANLAB_BENCH_LATER=1``: a busy process starts at ``LATER_AT`` of the steps, and the rate is that of the steps
    after ``LATER_FROM`` (the run's answer to it included)."""
    setting = os.environ.get("GANLAB_BENCH_THREADS", "")
    govern = os.environ.get("GANLAB_BENCH_GOVERN", "1") != "0"
    later = os.environ.get("GANLAB_BENCH_LATER") == "1"
    cfg = compose(["data=digits", "metrics=none", *([f"model.threads={setting}"] if setting else [])])
    timer = _timer_callback(max(1, int(LATER_AT * steps)) if later else None)
    warmup = int(LATER_FROM * steps) if later else max(2, steps // 5)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rate, _ = pipeline_run(cfg, steps, warmup, Path(tmp), govern=govern, timer=timer)
    finally:
        if timer.neighbour is not None:
            timer.neighbour.kill()
            timer.neighbour.wait()
    print(f"RATE {rate} {torch.get_num_threads()}", flush=True)


@dataclass
class Shared:
    """One thread setting's shared-machine figures (medians over the rounds), G steps/s: ``alone``, ``beside`` a
    busy process that was there first, with one that starts during the run (``later``); ``used``: the thread counts
    it ended with, per scenario."""

    name: str
    alone: float
    beside: float
    later: float
    used: str


def shared_rates(steps: int, rounds: int) -> list[Shared]:
    """Per thread setting, the default digits run alone, beside a CPU-bound process that starts first (as a run
    starts on a busy machine) and with one that starts during the run (:data:`LATER_AT`). The settings take turns
    within each round (not one setting's rounds after another's), so a drift of the machine's speed over the
    minutes of the table hits every setting alike."""
    rates: dict[tuple[str, str], list[float]] = {}
    used: dict[tuple[str, str], set[str]] = {}
    for _ in range(rounds):
        for name, env in SHARED_VARIANTS.items():
            for scenario in SCENARIOS:
                hog = busy_process() if scenario == "beside" else None
                later = {"GANLAB_BENCH_LATER": "1"} if scenario == "later" else {}
                try:
                    res = subprocess.run(
                        [sys.executable, "-m", "ganlab.bench", "--child-rate", str(steps)],
                        env={**{k: v for k, v in os.environ.items() if k not in _OMP_VARS}, **env, **later},
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                _, rate, n = next(ln for ln in res.stdout.splitlines() if ln.startswith("RATE")).split()
                rates.setdefault((name, scenario), []).append(float(rate))
                used.setdefault((name, scenario), set()).add(n)
    return [
        Shared(
            name,
            *(statistics.median(rates[name, scenario]) for scenario in SCENARIOS),
            "/".join(",".join(sorted(used[name, scenario])) for scenario in SCENARIOS),
        )
        for name in SHARED_VARIANTS
    ]


def shared_verdict(shared: Sequence[Shared]) -> str:
    """The line under the shared-machine table: what ``auto`` keeps beside a busy process (goal >= 70 %) and with
    one that starts later, and its speed alone against torch's own default threads, the baseline of the goal
    "alone it loses <= 10 %" (issue 12: 38.9 G steps/s then), and against the default before the governor."""
    by_name = {row.name: row for row in shared}
    auto, before, torch_default = by_name[AUTO_VARIANT], by_name[BEFORE_VARIANT], by_name[TORCH_DEFAULT_VARIANT]
    return (
        f"auto keeps {100 * auto.beside / auto.alone:.0f} % of its alone speed beside a busy process (goal >= 70 %; "
        f"before the governor: {100 * before.beside / before.alone:.0f} %) and {100 * auto.later / auto.alone:.0f} % "
        f"with one that starts later (before: {100 * before.later / before.alone:.0f} %); alone it runs at "
        f"{100 * auto.alone / torch_default.alone:.0f} % of torch's default threads' rate (goal >= 90 %) and "
        f"{100 * auto.alone / before.alone:.0f} % of the rate before the governor"
    )


# -- the table ----------------------------------------------------------------------------------------------------
def machine() -> str:
    """CPU model, cores, torch version."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _settings(text: str) -> str:
    """``--settings``: a comma list of setting keys (the first word of a :data:`SETTINGS` name) or ``none``."""
    known = {name.split()[0] for name in SETTINGS}
    unknown = [k for k in text.split(",") if k and k != "none" and k not in known]
    if unknown:
        known_list = ", ".join(sorted(known))
        raise argparse.ArgumentTypeError(f"unknown setting(s) {', '.join(unknown)}; known: {known_list}, none")
    return text


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m ganlab.bench``."""
    parser = argparse.ArgumentParser(prog="python -m ganlab.bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short version: fewer steps and rounds (with --options, 170 s on the 2-core lab CPU, 68 s on an H200)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="pipeline/plain rounds per setting (default 3)")
    parser.add_argument("--options", action="store_true", help="also channels_last, bf16 and torch.compile")
    parser.add_argument("--shared", action="store_true", help="also digits alone / beside a busy process")
    parser.add_argument("--shared-steps", type=int, default=None, help="steps per --shared child (100/400)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation rows")
    parser.add_argument(
        "--settings", type=_settings, default="ring8,digits,32x32",
        help="pipeline/plain settings to run: ring8,digits,32x32 or none",
    )  # fmt: skip
    parser.add_argument("--child-rate", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child_rate is not None:
        _child_rate(args.child_rate)
        return 0
    import logging
    import warnings

    from ganlab.pipeline import _quiet_lightning

    _quiet_lightning()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    steps = {"ring8": 80, "digits": 30, "32x32": 5} if quick else {"ring8": 1500, "digits": 400, "32x32": 14}
    if _cuda():  # a GPU step takes milliseconds: at the CPU's counts the warm-up and the timer would be the figure
        steps = {"ring8": 1500, "digits": 400, "32x32": 200} if quick else {"ring8": 4000, "digits": 1500, "32x32": 600}
    chosen = [k for k in args.settings.split(",") if k and k != "none"]
    lines = [f"# ganlab benchmark ({'quick' if quick else 'full'}): {machine()}", ""]

    def emit(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    print(lines[0], flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        emit("| setting | pipeline G steps/s | plain loop G steps/s | ratio | 90 % interval "
             "| training_step alone: ratio | around it: ms a step |")  # fmt: skip
        emit("|---|---|---|---|---|---|---|")
        results: dict[str, Any] = {}
        rates: dict[str, float] = {}
        for name, overrides in SETTINGS.items():
            key = name.split()[0]
            if key not in chosen:
                continue
            speed, results[key] = compare(name, overrides, steps[key], rounds, work)
            rates[key] = speed.pipeline
            emit(f"| {name} | {speed.pipeline:.3g} | {speed.plain:.3g} | {speed.ratio:.3f} "
                 f"| {speed.ratio_low:.3f}-{speed.ratio_high:.3f} | {speed.step_ratio:.3f} "
                 f"| {speed.outside_ms:.2f} |")  # fmt: skip
        module32 = None
        if "32x32" in results:
            cfg32, module32 = results["32x32"]
            set_threads(cfg32)
            gflop = step_gflop(module32)
            rate32 = statistics.median(
                [plain_rate(module32, cfg32, steps["32x32"], 1) for _ in range(1 if quick else 2)]
            )
            mm = matmul_gflops()
            emit()
            emit(f"32x32 DCGAN step: {gflop:.1f} GFLOP, {gflop * rate32:.0f} GFLOP/s (plain loop); "
                 f"float32 2048x2048 matmul: {mm:.0f} GFLOP/s ({gflop * rate32 / mm:.2f}x)")  # fmt: skip
        if not args.no_eval:
            emit()
            emit("| data | eval samples | one evaluation s | pipeline G steps/s | evaluations | share of default run |")
            emit("|---|---|---|---|---|---|")
            for data in BUILTIN_DATA:
                n = 500 if quick and data == "stacked_digits" else None  # --quick: not the 26k protocol
                known = rates.get(data) if quick else None  # --quick reuses the setting's rate (batch 64 / 256)
                cost = eval_cost(data, 30 if quick else 300, n, work, rate=known)
                emit(f"| {data} | {cost.n_samples} | {cost.seconds:.2f} | {cost.steps_per_s:.3g} | {cost.evals} | "
                     f"{100 * cost.share:.1f} % |")  # fmt: skip
        emit()
        emit("| minibatch discrimination, n=256, A=128, 1 thread | forward+backward ms, median | best | goal |")
        emit("|---|---|---|---|")
        mlp = compose(["model=mlp"]).model.minibatch
        with _threads(1):
            for b, c, goal in ((100, 5, 30), (int(mlp.n_kernels), int(mlp.kernel_dim), 3)):
                median, best = md_ms(256, 128, b, c, reps=3 if quick else 15)
                emit(f"| B={b}, C={c} | {median:.2f} | {best:.2f} | <= {goal} |")
        ns, md = md_arm_rates(30 if quick else 600, 1 if quick else 3, work)
        emit()
        emit(f"ring8 at the defaults, pipeline G steps/s: non_saturating {ns:.3g}, minibatch_discrimination {md:.3g}; "
             f"wall-time ratio {ns / md:.2f}x (goal <= 2.5x)")  # fmt: skip
        if args.options and module32 is not None:
            emit()
            emit("| 32x32 DCGAN plain loop, option | G steps/s |")
            emit("|---|---|")
            for name, value in option_rates(module32, max(4, steps["32x32"] // 2)).items():
                emit(f"| {name} | {value} |")
            try:
                bf16 = compose([*SETTINGS["32x32 DCGAN b64"], "trainer.precision=bf16-mixed"])
                rate, _ = pipeline_run(bf16, max(4, steps["32x32"] // 2), 1, work / "bf16")
                emit(f"| pipeline, trainer.precision=bf16-mixed | {rate:.3g} |")
            except Exception as exc:
                emit(f"| pipeline, trainer.precision=bf16-mixed | fails: {type(exc).__name__} |")
        if args.shared:
            emit()
            emit("| default digits run, threads | threads at the end (alone/beside/later) | alone G steps/s "
                 "| beside 1 busy process | kept | busy process from 40 % of the run | kept |")  # fmt: skip
            emit("|---|---|---|---|---|---|---|")
            shared = shared_rates(args.shared_steps or (100 if quick else 400), args.rounds or (1 if quick else 3))
            for row in shared:
                kept, kept_later = 100 * row.beside / row.alone, 100 * row.later / row.alone
                emit(f"| {row.name} | {row.used} | {row.alone:.3g} | {row.beside:.3g} | {kept:.0f} % "
                     f"| {row.later:.3g} | {kept_later:.0f} % |")  # fmt: skip
            emit(shared_verdict(shared))
    emit()
    emit(f"measured in {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
