"""Shared fixtures: composing the project's config with Hydra's compose API, tiny budgets, and a quiet CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ganlab.tricks.base import Trick

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN = ROOT / "src" / "train.py"

os.environ.setdefault("WANDB_SILENT", "true")
# model.threads=auto (the DCGAN default) would pick 1 or 2 threads by the machine's load, and float reductions
# depend on the count: runs the tests compare use a fixed one (test_threads.py unsets it to test auto)
os.environ.setdefault("OMP_NUM_THREADS", "2")

# a tiny, fast 2-D setting for tests that train in-process
TINY = [
    "data=ring8",
    "logger=csv",
    "model.generator.width=16",
    "model.discriminator.width=16",
    "batch_size=8",
    "log_every=1",
    "sample_every=1000",
    "ckpt_every=1000",
]


def fit_in_process(module, g_steps: int, callbacks: Sequence = ()):
    """Train ``module`` for ``g_steps`` generator steps under a bare Trainer (no logger; the budget in optimizer
    steps read from the module's schedule); returns the Trainer."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        max_steps=g_steps * module.schedule.optimizer_steps,
        logger=False,
        callbacks=list(callbacks),
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return trainer


def comparison_arms() -> list[str]:
    """THE list of comparison arms (conf/sweep/arms.yaml), in the order the sweeps run them."""
    import yaml

    spec = yaml.safe_load((CONF / "sweep" / "arms.yaml").read_text())
    return [a.strip() for a in str(spec["hydra"]["sweeper"]["params"]["loss"]).split(",")]


def compose_cfg(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python src/train.py <overrides>`` would run with (without the hydra node)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def deterministic_mode_restored():
    """For a test whose runs may set ``trainer.deterministic=true``: Lightning then turns on torch's process-wide
    ``use_deterministic_algorithms`` and sets ``CUBLAS_WORKSPACE_CONFIG``. Both are as before once the test ends."""
    import torch

    name = "CUBLAS_WORKSPACE_CONFIG"
    flag, value = torch.are_deterministic_algorithms_enabled(), os.environ.get(name)
    yield
    torch.use_deterministic_algorithms(flag)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two loaded ``last.ckpt`` files hold the same weights and buffers and the same Adam moments, bit for bit:
    what a resumed, re-run or repeated run must reproduce."""
    import torch

    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pa, pb in zip(sa["state"].values(), sb["state"].values(), strict=True):
            assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


def run_cli(
    args: Sequence[str], tmp_path: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``src/train.py`` in a subprocess with its outputs under ``tmp_path``."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    cmd = [
        sys.executable,
        str(TRAIN),
        f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        *args,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    import torch

    torch.set_num_threads(2)


class NaNFrom(Trick):
    """A test-only trick: D's loss becomes NaN from generator step ``step`` on."""

    def __init__(self, step: int) -> None:
        self.step, self.module = step, None

    def setup(self, module) -> None:
        self.module = module

    def penalty(self, player, net):
        import torch

        return torch.tensor(float("nan")) if player == "D" and self.module.g_step >= self.step else None


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``): a LevelDB-style log of 32 KiB
    blocks after a 7-byte header, each record a 7-byte header (crc, length, type) and a chunk."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
            buf = b""
    records = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records
