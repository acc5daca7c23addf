"""The alternating schedule: exactly k D updates per G update, fresh real batches, each update touching only its
own player, and a resumed run that continues exactly where it stopped."""

from __future__ import annotations

import itertools
import json
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import TINY, assert_same_training_state, compose_cfg, fit_in_process
from ganlab.errors import Diverged
from ganlab.pipeline import build, train


class Spy(pl.Callback):
    """Records every optimizer step, and whether it changed G's and D's parameters."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool, bool]] = []

    def on_train_start(self, trainer: pl.Trainer, module) -> None:
        opt_g, opt_d = trainer.optimizers
        snap: dict[str, list[torch.Tensor]] = {}

        def pre(name):
            def hook(opt, args, kwargs):
                snap["G"] = [p.detach().clone() for p in module.G.parameters()]
                snap["D"] = [p.detach().clone() for p in module.D.parameters()]

            return hook

        def post(name):
            def hook(opt, args, kwargs):
                g_same = all(torch.equal(a, b) for a, b in zip(snap["G"], module.G.parameters()))
                d_same = all(torch.equal(a, b) for a, b in zip(snap["D"], module.D.parameters()))
                self.events.append((name, g_same, d_same))

            return hook

        for name, opt in (("G", opt_g), ("D", opt_d)):
            opt.register_step_pre_hook(pre(name))
            opt.register_step_post_hook(post(name))


@pytest.mark.parametrize("loss", ["non_saturating", "feature_matching"])
def test_exactly_k_d_updates_per_g_update_each_on_a_fresh_batch(loss: str) -> None:
    cfg = compose_cfg([*TINY, "d_steps=3", "max_steps=5", f"loss={loss}"])
    module = build(cfg)
    seen: list[torch.Tensor] = []
    real_batch = module.real_batch

    def recording(idx: torch.Tensor) -> torch.Tensor:
        seen.append(idx.clone())
        return real_batch(idx)

    module.real_batch = recording
    noise: list[torch.Tensor] = []
    module.G.register_forward_pre_hook(lambda net, args: noise.append(args[0].detach().clone()))
    spy = Spy()
    trainer = fit_in_process(module, 5, [spy])

    players = [e[0] for e in spy.events]
    assert players == ["D", "D", "D", "G"] * 5
    assert module.g_step == 5 and module.d_updates == 15 and trainer.global_step == 20
    for name, g_same, d_same in spy.events:
        if name == "D":
            assert g_same and not d_same  # a D update leaves G bit-identical
        else:
            assert d_same and not g_same  # and vice versa
    # feature matching also draws one real batch per G step for its statistics
    per_step = 4 if loss == "feature_matching" else 3
    assert len(seen) == 5 * per_step
    distinct = {tuple(s.tolist()) for s in seen}
    assert len(distinct) == len(seen)  # every real batch is a fresh draw
    # every update (3 D, 1 G per step) draws its own noise: G never reuses a D step's z, D steps never share one
    assert len(noise) == 5 * 4
    assert len({tuple(z.flatten().tolist()) for z in noise}) == len(noise)


def test_resumed_run_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    # the first half stands in for an interrupted run by a shorter budget, so the lr schedule must not depend on it
    common = [*TINY, "d_steps=2", "ckpt_every=4", "seed=3", "model.lr_decay=none"]
    full = train(compose_cfg([*common, "max_steps=8"]), tmp_path / "full")
    train(compose_cfg([*common, "max_steps=4"]), tmp_path / "first")
    resumed = train(compose_cfg([*common, "max_steps=8", f"resume={tmp_path / 'first'}"]), tmp_path / "second")
    assert resumed["g_steps"] == 8 and resumed["global_step"] == 8 * 3
    assert resumed["resumed_from"].endswith("first/checkpoints/last.ckpt")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    assert_same_training_state(a, b)
    assert full["final"] == resumed["final"]
    # the CSV of the resumed run starts after the checkpoint
    rows = (tmp_path / "second" / "metrics.csv").read_text().splitlines()
    assert rows[1].split(",")[-1] != "1"


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # the D loss turns NaN from generator step 3 on (conftest.NaNFrom), after three good checkpointed steps
    poison = ["+tricks.poison._target_=conftest.NaNFrom", "+tricks.poison.step=3"]
    with pytest.raises(Diverged):
        train(compose_cfg([*TINY, "max_steps=50", "ckpt_every=1", "log_every=1000", *poison]), tmp_path / "bad")
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "loss/d = nan" in summary["error"]
    ckpt = torch.load(tmp_path / "bad" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ganlab"]["g_step"] == 3  # the last good state, not the step that produced NaN
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


DECAY_FROM_0 = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
DECAY_FROM_HALF = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]


@pytest.mark.parametrize(("start", "expected"), [(0.0, DECAY_FROM_0), (0.5, DECAY_FROM_HALF)])
def test_linear_lr_decay_is_constant_until_its_start_then_falls_to_zero(start: float, expected: list[float]) -> None:
    """``model.lr_decay=linear``: the lr of G update t (0-based) is ``lr * factor(t)``, factor 1 until
    ``lr_decay_from * max_steps`` and ``(T - t) / (T - start)`` after; D's follows the same factor."""
    cfg = compose_cfg([*TINY, "max_steps=10", "model.lr_decay=linear", f"model.lr_decay_from={start}"])
    module = build(cfg)
    seen: dict[str, list[float]] = {"G": [], "D": []}

    class LrSpy(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
            for name, opt in zip(("G", "D"), trainer.optimizers, strict=True):
                opt.register_step_pre_hook(lambda o, a, k, name=name: seen[name].append(o.param_groups[0]["lr"]))

    fit_in_process(module, 10, [LrSpy()])
    lr_g, lr_d = float(cfg.model.optim_g.lr), float(cfg.model.optim_d.lr)
    assert seen["G"] == pytest.approx([lr_g * f for f in expected])
    d_steps = module.schedule.count("D")
    assert seen["D"] == pytest.approx([lr_d * f for f in expected for _ in range(d_steps)])
    assert module.lr_factor() == 0.0  # after the last update


def test_d_steps_null_takes_the_data_sets_k_and_a_number_overrides_it() -> None:
    assert compose_cfg(["data=gauss1d"]).d_steps is None  # the config leaves k to the data set
    assert build(compose_cfg(["data=gauss1d"])).schedule.count("D") == 3  # the 1-D demo: D near its optimum
    assert build(compose_cfg(["data=gauss1d", "d_steps=1"])).schedule.count("D") == 1
    assert build(compose_cfg(TINY)).schedule.count("D") == 1


class BackwardHooks(pl.Callback):
    """Counts Lightning's backward hook: having one makes the module go through ``manual_backward``."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer: pl.Trainer, module) -> None:
        self.calls += 1


class StepHooks(BackwardHooks):
    """Counts Lightning's hook before an optimizer step instead: having one keeps ``LightningOptimizer.step``."""

    on_after_backward = pl.Callback.on_after_backward

    def on_before_optimizer_step(self, trainer: pl.Trainer, module, optimizer) -> None:
        self.calls += 1


def test_the_direct_backward_and_step_train_the_same_bits_and_yield_to_lightnings_hooks() -> None:
    # with nothing on Lightning's backward or step path the training step calls loss.backward() and the bare
    # optimizer step (between Lightning's step counters) itself; a callback with a hook there gets Lightning's
    # path (its hook runs once per update); all train the same bits and count the same optimizer steps
    runs = []
    for hooks in (None, BackwardHooks(), StepHooks()):
        pl.seed_everything(0, verbose=False)
        module = build(compose_cfg(TINY))
        trainer = fit_in_process(module, 4, [hooks] if hooks else [])
        runs.append((module, hooks, trainer.global_step))
    (direct, _, steps), *others = runs
    assert direct._direct_backward and direct._direct_step and steps == 8
    assert [(m._direct_backward, m._direct_step) for m, _, _ in others] == [(False, True), (True, False)]
    for module, hooks, global_step in others:
        assert hooks.calls == module.d_updates + module.g_step == global_step == 8
        for a, b in zip(direct.state_dict().values(), module.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_a_loss_scaling_precision_keeps_lightnings_backward() -> None:
    from types import SimpleNamespace

    from pytorch_lightning.plugins.precision import MixedPrecision

    from ganlab.tasks.gan import backward_is_plain, step_is_plain

    module = build(compose_cfg(TINY))
    plain = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"), strategy=SimpleNamespace(model=None),
                            callbacks=[])  # fmt: skip
    assert backward_is_plain(plain, module)
    scaled = MixedPrecision("16-mixed", "cpu", scaler=SimpleNamespace())
    assert not backward_is_plain(SimpleNamespace(**{**vars(plain), "precision_plugin": scaled}), module)
    assert not backward_is_plain(SimpleNamespace(**{**vars(plain), "callbacks": [BackwardHooks()]}), module)
    assert not step_is_plain(SimpleNamespace(**{**vars(plain), "precision_plugin": scaled}), module)


def test_per_step_attribute_writes_skip_nn_module_bookkeeping_and_nothing_else(monkeypatch) -> None:
    from ganlab.tasks.gan import GANModule

    module, probe = build(compose_cfg(TINY)), torch.nn.Linear(1, 1)
    seen: list[str] = []
    inner = torch.nn.Module.__setattr__
    monkeypatch.setattr(torch.nn.Module, "__setattr__", lambda self, k, v: (seen.append(k), inner(self, k, v))[1])
    for name in GANModule._PLAIN_ATTRIBUTES:
        setattr(module, name, 7)
        assert module.__dict__[name] == 7  # a plain attribute: never a parameter, buffer or submodule
        assert name not in {*module._parameters, *module._buffers, *module._modules}
    assert seen == []  # Lightning's ~20 writes of _current_fx_name a step skip nn.Module's __setattr__
    module.probe = probe  # any other name still goes through it: a submodule is registered
    assert seen == ["probe"] and "probe" in module._modules


def test_lightning_skips_the_ticks_batch_transfer_and_reads_training_steps_cached_signature(monkeypatch) -> None:
    import inspect

    from ganlab.tasks.gan import GANModule

    def moved(*args, **kwargs):
        raise AssertionError("Lightning ran its batch transfer on the ticks")

    for hook in ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"):
        monkeypatch.setattr(GANModule, hook, moved)
    module = build(compose_cfg(TINY))
    trainer = fit_in_process(module, 3)
    assert module.g_step == 3 and trainer.global_step == 3 * module.schedule.optimizer_steps
    # what inspect hands Lightning at every step without rebuilding it: the real parameters
    assert "__signature__" in vars(GANModule.training_step)
    assert inspect.getfullargspec(module.training_step).args == ["self", "batch", "batch_idx"]


def test_several_steps_per_call_train_the_same_bits_and_act_on_the_same_steps(tmp_path: Path, monkeypatch) -> None:
    # model.steps_per_call: one training_step call runs up to that many generator steps, cut short at every step a
    # callback acts on (samples every 25, checkpoints every 30, evaluation every 100, a progress line every 10, the
    # progress bar's losses every 7 = log_every) and at the budget. The records are the same bits as one step a call.
    import csv

    from ganlab.tasks.gan import GANModule

    calls: list[int] = []
    inner = GANModule.steps_this_call
    monkeypatch.setattr(GANModule, "steps_this_call", lambda self: calls.append(inner(self)) or calls[-1])
    common = [*TINY, "max_steps=200", "sample_every=25", "ckpt_every=30", "log_every=7", "metrics.eval_every=100"]
    runs = {}
    for n in (1, 7):
        calls.clear()
        summary = train(compose_cfg([*common, f"model.steps_per_call={n}"]), tmp_path / str(n))
        runs[n] = summary, list(calls), tmp_path / str(n)
    (one, calls1, dir1), (seven, calls7, dir7) = runs[1], runs[7]
    assert calls1 == [1] * 200
    # each call of the 7-step run stops at the first step due for a callback (the log steps too: the progress bar
    # shows their losses), and only there or after 7 steps
    due = {s for s in range(1, 201) if any(s % every == 0 for every in (7, 10, 25, 30, 100, 200))}
    ends = list(itertools.accumulate(calls7))
    assert sum(calls7) == 200 and max(calls7) == 7 and len(calls7) < 200 / 3
    for start, end in zip([0, *ends], ends):
        assert not due & set(range(start + 1, end)), (start, end)  # no due step inside a call
        assert end in due or end - start == 7, (start, end)  # and no call shorter than it must be
    assert one["final"] == seven["final"] and one["global_step"] == seven["global_step"] == 400

    def rows(run_dir: Path) -> list[dict[str, str]]:  # eval/seconds is a timing, not a result
        with (run_dir / "metrics.csv").open() as f:
            return [{k: v for k, v in row.items() if k != "eval/seconds"} for row in csv.DictReader(f)]

    assert rows(dir1) == rows(dir7) and len(rows(dir1)) > 28  # every 7th step's losses and both evaluations
    samples = sorted(p.name for p in (dir1 / "samples").glob("*.png"))
    assert samples == sorted(p.name for p in (dir7 / "samples").glob("*.png"))
    assert samples == [f"step_{s:07d}.png" for s in range(25, 201, 25)]
    for name in samples:
        assert (dir1 / "samples" / name).read_bytes() == (dir7 / "samples" / name).read_bytes(), name
    a = torch.load(dir1 / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(dir7 / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["ganlab"]["g_step"] == b["ganlab"]["g_step"] == 200 and a["global_step"] == b["global_step"]
    assert_same_training_state(a, b)


def test_steps_per_call_auto_is_several_on_a_gpu_and_one_on_the_cpu() -> None:
    from ganlab.tasks.gan import AUTO_STEPS_PER_CALL, resolve_steps_per_call

    assert resolve_steps_per_call("auto", torch.device("cpu")) == 1
    assert resolve_steps_per_call("auto", torch.device("cuda", 0)) == AUTO_STEPS_PER_CALL > 1
    assert resolve_steps_per_call(7, torch.device("cpu")) == 7
    module = build(compose_cfg(["data=digits", "logger=csv", "batch_size=8", "metrics=none"]))  # the conv default
    assert module.steps_per_call == "auto"
    fit_in_process(module, 3, [])
    assert module._call_steps == 1 and module.g_step == 3


def test_a_callback_that_does_not_declare_its_cadence_gets_one_step_a_call() -> None:
    from ganlab.tasks.gan import step_cadences

    class Declared(pl.Callback):
        step_cadence = (6, 4)

    assert step_cadences([Declared(), Declared()]) == (4, 6)
    assert step_cadences([Declared(), Spy()]) is None
    for extra, steps in (([], 5), ([Spy()], 1)):
        module = build(compose_cfg([*TINY, "max_steps=9", "model.steps_per_call=5"]))
        fit_in_process(module, 9, [Declared(), *extra])
        assert module.g_step == 9
        assert module._call_steps == steps and module._cadences == ((4, 6) if steps > 1 else ())
        # the next call from each step: up to 5 steps, to the next multiple of 4 or 6, to the budget of 9
        expected = {0: 4, 4: 2, 6: 2, 8: 1} if steps > 1 else {0: 1, 4: 1, 6: 1, 8: 1}
        for g_step, n in expected.items():
            module.g_step = g_step
            assert module.steps_this_call() == n, g_step


def test_the_progress_callback_cuts_calls_alike_with_or_without_its_bar(monkeypatch) -> None:
    # a DDP run's ranks must run the same steps in each call (the preemption flags and checkpoints are collectives
    # at call ends): rank 0 on a terminal draws a bar, the other ranks print nothing, and all declare one cadence
    from types import SimpleNamespace

    from ganlab.callbacks import StepProgress

    module = SimpleNamespace(g_step=0, max_steps=400, log_every=7)
    cadences = []
    for tty, zero in ((True, True), (False, True), (True, False)):
        monkeypatch.setattr("sys.stdout.isatty", lambda tty=tty: tty)
        progress = StepProgress()
        progress.on_train_start(SimpleNamespace(is_global_zero=zero), module)
        assert (progress.bar is not None) == (tty and zero)
        cadences.append(progress.step_cadence)
        progress.on_train_end(None, module)
    assert cadences == [(20, 7)] * 3  # a line every 400 / 20 steps; the bar's losses at each log step


def _torch_plumbing(filename: str) -> bool:
    """A frame of torch's call machinery (dispatch modes, ``torch._dynamo.disable`` wrappers), not of an op."""
    path = Path(filename).as_posix()
    return any(
        part in path
        for part in ("torch/_compile.py", "torch/_dynamo/", "torch/utils/_python_dispatch", "torch/_ops.py")
    )


def _ganlab_caller() -> str | None:
    """``file.py:line`` of the Python line that made the current torch call, when it is a line of ganlab's code (not
    of torch's own Python, tests or libraries): the first frame outside torch's call machinery."""
    caller = next(f for f in reversed(traceback.extract_stack()[:-2]) if not _torch_plumbing(f.filename))
    return f"{Path(caller.filename).name}:{caller.lineno}" if "ganlab" in Path(caller.filename).parts else None


class _DevicelessFactories(torch.overrides.TorchFunctionMode):
    """Records the tensor factories (``torch.tensor``, ``zeros``, ``arange``, ...) that ganlab's own code calls
    with no ``device`` and no tensor to take one from: they make CPU tensors whatever device the run is on, and on
    a GPU the first op that mixes one with the step's tensors fails (as ``lr/g`` once did at every log step)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils._device import _device_constructors

        self.factories = _device_constructors()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        follows = any(isinstance(a, torch.Tensor) for a in args)  # torch.as_tensor(t): t's device
        if func in self.factories and kwargs.get("device") is None and not follows:
            caller = _ganlab_caller()
            if caller is not None:
                self.calls.append(f"{func.__name__} at {caller}")
        return func(*args, **kwargs)


# every arm, the tricks and the semi-supervised task: the configs whose training step the two CPU-checkable halves
# of the GPU path watch (tensors made without a device; host reads between log steps)
STEP_CONFIGS = pytest.mark.parametrize(
    "overrides",
    [
        [*TINY, "loss=minimax", "tricks=[ema,historical_averaging,label_smoothing,spectral_norm]"],
        [*TINY, "loss=feature_matching", "model.lr_decay=linear"],
        [*TINY, "loss=minibatch_discrimination"],
        [*TINY, "loss=ns_then_minimax"],
        ["data=digits", "logger=csv", "batch_size=8", "tricks=[virtual_batch_norm,batch_norm_d,ema]"],
        ["data=digits", "logger=csv", "batch_size=8", "task=semi_supervised"],
    ],
    ids=["minimax+tricks", "feature_matching", "minibatch_discrimination", "ns_then_minimax", "vbn+bn+ema", "ssl"],
)


@STEP_CONFIGS
def test_every_tensor_a_training_step_makes_names_its_device(tmp_path: Path, monkeypatch, overrides) -> None:
    """CPU-checkable half of the GPU path: inside training_step (log steps included), no factory call of ganlab's
    code leaves its tensor on the default device."""
    from ganlab.tasks.gan import GANModule

    mode = _DevicelessFactories()
    original = GANModule.training_step

    def watched(self, batch, batch_idx):
        with mode:
            return original(self, batch, batch_idx)

    monkeypatch.setattr(GANModule, "training_step", watched)
    cfg = compose_cfg([*overrides, "max_steps=3", "log_every=1", "metrics=none", "model.threads=1"])
    assert train(cfg, tmp_path / "run")["status"] == "completed"
    assert mode.calls == []


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every read of a tensor's value by ganlab's code (``.item()``, ``bool()``, ``float()``, a 0-dim
    tensor passed where an op takes a Python number): ``aten::_local_scalar_dense``, the op each of them dispatches
    to, called from a line of ganlab. On a GPU every such read waits for the device; here on the CPU it shows where
    one would. Reads inside torch's own Python code are left out: Adam reads its ``step`` counter, which it keeps on
    the CPU on a GPU too."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            caller = _ganlab_caller()  # the Python line whose call needed the value
            if caller is not None:
                self.reads.append(caller)
        return func(*args, **(kwargs or {}))


@STEP_CONFIGS
def test_no_host_read_in_a_training_step_outside_log_steps(tmp_path: Path, monkeypatch, overrides) -> None:
    """CPU-checkable half of the GPU's no-sync test (``tests/test_gpu.py``, ``set_sync_debug_mode``): between log
    steps, a training step reads no tensor value on the host. The first two steps may (lazy initialisation)."""
    from ganlab.tasks.gan import GANModule
    from ganlab.util import is_due

    mode, original, checked = _HostReads(), GANModule.training_step, []

    def watched(self, batch, batch_idx):
        if is_due(self.g_step + 1, self.log_every, self.max_steps) or self.g_step < 2:
            return original(self, batch, batch_idx)
        checked.append(self.g_step)
        with mode:
            return original(self, batch, batch_idx)

    monkeypatch.setattr(GANModule, "training_step", watched)
    overrides = [*overrides, "max_steps=8", "log_every=4", "metrics=none", "model.threads=1", "model.steps_per_call=1"]
    assert train(compose_cfg(overrides), tmp_path / "run")["status"] == "completed"
    assert len(checked) == 4  # steps 3, 4, 6 and 7 (0-based g_step 2, 3, 5, 6)
    assert mode.reads == []
