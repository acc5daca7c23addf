"""Several processes for one run (DDP, ``trainer.devices=2`` on the CPU with gloo): every rank takes every step, draws
its own batches (rank 0 the single-process stream), ends with the same weights and metrics as the others, rank 0
alone writes the run, and a DDP run interrupted by a signal to rank 0 resumes to exactly the uninterrupted run.

Rank 0 runs in this process (``train()`` from Python, as a notebook would); rank 1 is the worker it starts. Both
carry :class:`Spy`, a test-only trick (instantiated from the config in each process) that reports what its rank did.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY, compose_cfg
from ganlab.errors import Interrupted, UserError
from ganlab.pipeline import train, validate
from ganlab.tricks.base import Trick

TESTS = Path(__file__).resolve().parent
DDP = ["trainer.accelerator=cpu", "trainer.devices=2"]
COMMON = [*TINY, "model.lr_decay=none", "d_steps=2", "ckpt_every=4", "max_steps=8"]

# -- the spy --------------------------------------------------------------------------------------------------------

_WATCHED: list[Spy] = []  # the spies whose process-wide audit hook records file writes


def _audit(event: str, args: tuple) -> None:
    if not _WATCHED or event not in ("open", "os.rename", "os.remove", "os.mkdir", "os.rmdir"):
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if not writes:
            return
    else:
        path = args[0]
    for spy in _WATCHED:
        if isinstance(path, (str, os.PathLike)) and str(path).startswith(spy.watch):
            spy.writes.append(f"{event} {os.fspath(path)}")


class Spy(Trick):
    """Records this rank's real-batch indices and noise per update and the files it writes under ``watch``; at
    every checkpoint (and, on ranks > 0, at exit) writes ``rank<k>.json`` into ``out``: steps, updates, final values,
    a digest of G's and D's state, batches and writes. ``stop_at``: rank 0 sends itself SIGTERM after that
    generator step's G update."""

    def __init__(self, out: str, watch: str, stop_at: int = -1) -> None:
        self.out, self.watch, self.stop_at = Path(out), str(watch), int(stop_at)
        self.batches: list[list[Any]] = []
        self.writes: list[str] = []
        self.module: Any = None
        self._exit_hook = False
        if not _WATCHED:
            sys.addaudithook(_audit)  # once per process; cannot be removed, so it dispatches to _WATCHED
        _WATCHED[:] = [self]

    def setup(self, module: Any) -> None:
        self.module = module
        real_batch = module.real_batch

        def recording(idx: torch.Tensor) -> torch.Tensor:
            self.batches.append([module.g_step, "idx", _digest(idx)])
            return real_batch(idx)

        module.real_batch = recording
        module.G.register_forward_pre_hook(self._noise)

    def _noise(self, net: torch.nn.Module, args: tuple) -> None:
        if net.training:  # the updates' noise, not the fixed or evaluation noise (eval mode)
            self.batches.append([self.module.g_step, "z", _digest(args[0])])

    def after_update(self, player: str, net: torch.nn.Module) -> None:
        if player == "G" and self.module.g_step == self.stop_at and self.module.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def state_dict(self) -> dict[str, Any]:
        self.report()
        if self.module.rank > 0 and not self._exit_hook:
            atexit.register(self.report)
            self._exit_hook = True
        return {}

    def report(self) -> None:
        m = self.module
        state = [*m.G.parameters(), *m.D.parameters(), *m.G.buffers(), *m.D.buffers()]
        self.out.mkdir(parents=True, exist_ok=True)
        report = {
            "rank": m.rank,
            "world_size": m.world_size,
            "g_step": m.g_step,
            "d_updates": m.d_updates,
            "threads": torch.get_num_threads(),
            "final": {k: v for k, v in m.last_logged.items() if k != "eval/seconds"},
            "state": hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes() for t in state)).hexdigest(),
            "batches": self.batches,
            "writes": self.writes,
        }
        (self.out / f"rank{m.rank}.json").write_text(json.dumps(report))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def _spy(out: Path, watch: Path, stop_at: int = -1) -> list[str]:
    return [
        "+tricks.spy._target_=test_ddp.Spy",
        f"+tricks.spy.out={out}",
        f"+tricks.spy.watch={watch}",
        f"+tricks.spy.stop_at={stop_at}",
    ]


def _reports(out: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if k != "eval/seconds"} for r in csv.DictReader(f)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _ddp_env(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))  # rank 1 imports Spy
    mp.setenv("GANLAB_DDP_TIMEOUT_S", "120")  # a broken collective fails the test instead of hanging for 30 min


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An 8-step DDP run (2 ranks) and the same run in one process, each with a spy."""
    tmp = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as mp:
        _ddp_env(mp)
        ddp = train(compose_cfg([*COMMON, *DDP, *_spy(tmp / "spy_ddp", tmp / "ddp")]), tmp / "ddp")
    single = train(compose_cfg([*COMMON, *_spy(tmp / "spy_single", tmp / "single")]), tmp / "single")
    return {
        "tmp": tmp,
        "ddp": ddp,
        "single": single,
        "ddp_spy": _reports(tmp / "spy_ddp"),
        "single_spy": _reports(tmp / "spy_single"),
    }


# -- the tests ------------------------------------------------------------------------------------------------------


def test_every_rank_takes_every_step(runs: dict[str, Any]) -> None:
    assert runs["ddp"]["status"] == "completed"
    assert runs["ddp"]["g_steps"] == 8 and runs["ddp"]["d_updates"] == 16 and runs["ddp"]["global_step"] == 24
    spies = runs["ddp_spy"]
    assert sorted(spies) == [0, 1]
    for rank, spy in spies.items():
        assert spy["rank"] == rank and spy["world_size"] == 2
        assert spy["g_step"] == 8 and spy["d_updates"] == 16, rank
        # 2 D updates (indices + noise) and 1 G update (noise) per step
        assert len(spy["batches"]) == 8 * 5, rank


def test_each_rank_draws_its_own_batches_and_rank_0_the_single_process_stream(runs: dict[str, Any]) -> None:
    rank0, rank1 = runs["ddp_spy"][0]["batches"], runs["ddp_spy"][1]["batches"]
    assert [b[:2] for b in rank0] == [b[:2] for b in rank1]  # the same steps and kinds of draw...
    assert all(a[2] != b[2] for a, b in zip(rank0, rank1, strict=True))  # ...every one of them different
    assert rank0 == runs["single_spy"][0]["batches"]  # rank 0 draws what one process draws


def test_every_rank_ends_with_the_same_weights_and_metrics(runs: dict[str, Any]) -> None:
    rank0, rank1 = runs["ddp_spy"][0], runs["ddp_spy"][1]
    assert rank0["state"] == rank1["state"]  # gradients averaged, buffers from rank 0
    assert rank0["final"] == rank1["final"]
    assert "modes2500" in rank1["final"] and "loss/d" in rank1["final"]  # evaluation and losses on both
    assert runs["ddp"]["final"] == {k: v for k, v in rank0["final"].items() if not k.startswith("step/")}
    assert rank0["state"] != runs["single_spy"][0]["state"]  # two ranks' gradients are not one rank's


def test_rank_0_alone_writes_the_run(runs: dict[str, Any]) -> None:
    run = runs["tmp"] / "ddp"
    assert runs["ddp_spy"][1]["writes"] == []
    assert any("/summary." in w for w in runs["ddp_spy"][0]["writes"])  # the spy does see rank 0's writes
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == ["checkpoints/last.ckpt", "config.yaml", "metrics.csv", "samples/step_0000008.png", "summary.json"]
    steps = [r["step"] for r in _rows(run / "metrics.csv")]
    assert steps == [r["step"] for r in _rows(runs["tmp"] / "single" / "metrics.csv")]  # nothing logged twice


def test_an_interrupted_ddp_run_resumes_to_the_uninterrupted_run(runs: dict[str, Any]) -> None:
    tmp = runs["tmp"]
    run, spy = tmp / "resumed", tmp / "spy_resumed"
    args = [*COMMON, *DDP, *_spy(spy, run, stop_at=4)]
    with pytest.MonkeyPatch.context() as mp:
        _ddp_env(mp)
        with pytest.raises(Interrupted):  # SIGTERM to rank 0 only, in step 5: both ranks stop at one step
            train(compose_cfg(args), run)
        stopped = _reports(spy)
        assert stopped[0]["g_step"] == stopped[1]["g_step"] == 6  # not a checkpoint step (4, 8): its own save
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["g_steps"] == stopped[0]["g_step"]
        resumed = train(compose_cfg([*args, "resume=auto"]), run)
    assert resumed["status"] == "completed" and resumed["g_steps"] == 8 and resumed["d_updates"] == 16
    assert resumed["final"] == runs["ddp"]["final"]
    ref, got = _weights(tmp / "ddp"), _weights(run)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _rows(run / "metrics.csv") == _rows(tmp / "ddp" / "metrics.csv")
    final = _reports(spy)
    assert final[1]["state"] == final[0]["state"] == runs["ddp_spy"][0]["state"]


@pytest.mark.parametrize("omp", [None, "2"], ids=["measured", "omp2"])
def test_auto_threads_split_the_free_cores_among_the_ranks_and_the_record_says_what_they_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, omp: str | None
) -> None:
    """Measured (no OMP_NUM_THREADS: the usable cores // 2), or a job given 2 cores by a launcher
    (OMP_NUM_THREADS=2): 1 thread on each of the 2 ranks, not 2 each on 2 cores."""
    from ganlab import threads

    _ddp_env(monkeypatch)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # auto measures (the suite pins 2 elsewhere)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(threads, "others_load", lambda probe_s=0.0: 0.0)  # a quiet node, whatever runs beside
    before = torch.get_num_threads()
    try:
        done = train(
            compose_cfg(
                [*COMMON, *DDP, "max_steps=2", "model.threads=auto", *_spy(tmp_path / "spy", tmp_path / "run")]
            ),
            tmp_path / "run",
        )
    finally:
        torch.set_num_threads(before)
    spies = _reports(tmp_path / "spy")
    expected = max(1, (int(omp) if omp else threads.usable_cores()) // 2)
    assert done["status"] == "completed" and sorted(spies) == [0, 1]
    assert spies[0]["threads"] == spies[1]["threads"] == expected  # each rank its share of the node
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["threads"] == expected  # the record agrees


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.devices=-1", "trainer.devices"),
        ("trainer.num_nodes=0", "trainer.num_nodes"),
        ("trainer.num_nodes=2", "trainer.num_nodes"),  # no multi-node launch (SLURM, torchrun, NODE_RANK)
        ("+trainer.strategy=fsdp", "trainer.strategy"),
    ],
)
def test_nonsense_process_counts_are_one_line(override: str, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match=key) as info:
        validate(compose_cfg([*TINY, override]))
    assert "\n" not in str(info.value)


def test_rank_0_keeps_the_single_process_stream() -> None:
    from ganlab.tasks.gan import _rng_seed

    # the formula before DDP (seed, step): single-process runs draw exactly what they drew before
    for seed, step in ((0, 0), (3, 5), (2**31, 10**6)):
        before = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
        assert _rng_seed(seed, step) == _rng_seed(seed, step, 0) == before
        assert len({_rng_seed(seed, step, r) for r in range(8)}) == 8
