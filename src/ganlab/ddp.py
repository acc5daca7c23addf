"""Several processes for one run (``trainer.devices=N``, ``trainer.num_nodes=M``): Lightning's DDP, adapted to a GAN
trained with manual optimisation, alternating players and Hydra.

**No DistributedDataParallel wrapper.** :class:`GANDDPStrategy` is Lightning's ``ddp`` strategy without the
wrapper; the module averages the updated player's gradients itself, after each update's backward, in one flat
all-reduce (:meth:`ganlab.tasks.gan.GANModule._apply_update`). Why not the wrapper:

- one training step runs ``d_steps + 1`` backward passes, each of one player, with the other frozen
  (``requires_grad=False``). A DDP reducer built over G and D expects gradients for every parameter at every
  backward: it fails on the frozen player ("Expected to have finished reduction in the prior iteration"), or, with
  ``find_unused_parameters=True``, walks the graph each backward and all-reduces the frozen player's zeros as well:
  on the digits DCGAN (G 265k parameters, D 134k) 399k numbers per update instead of 134k for D and 265k for G,
  twice the traffic per generator step at ``d_steps=1``;
- D runs two or three forwards per backward (real, fake, feature matching's joint pass) and G a reference pass
  (virtual batch norm): one backward per forward is DDP's contract, ``static_graph`` is needed to bend it, and
  separate DDP wrappers for G and D still meet the frozen-player problem in every G update (D is in its graph);
- gradients are all-reduced exactly once per update, only for the parameters that have them, with nothing to set
  up per player; overlap of communication with the backward (DDP's buckets) buys little on models this small.

Buffers (batch-norm running statistics) are taken from rank 0 before they are used or saved
(:meth:`~ganlab.tasks.gan.GANModule.sync_buffers`), as DDP's ``broadcast_buffers`` does.

**Processes.** Lightning's own ``ddp`` launcher re-runs ``sys.argv`` for every other rank (under Hydra with
``hydra.run.dir`` pinned to rank 0's): each copy runs the whole command, so it finds rank 0's ``summary.json``
(``running``) and refuses the folder or writes the record itself; under ``-m`` it re-runs the whole sweep, under the
local launcher submitit's job runner, and pytest when ``train()`` is called from Python. :class:`RankLauncher`
starts the other local ranks as ``python -c "from ganlab.ddp import worker_main; worker_main()"`` with the run's
resolved config, folder and checkpoint in the environment (:data:`WORKER_ENV`), so every launch path (``src/train.py``,
``ganlab-train``, a sweep, a test) works the same way, and rank 0 alone writes the run's files. Where the cluster
starts every process itself (SLURM with ``tasks_per_node`` = devices per node, torchrun), each process runs the
ordinary entry point and :func:`launch_rank` tells the others apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
from pytorch_lightning.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

WORKER_ENV = "GANLAB_DDP_WORKER"  # JSON: the resolved config, the run folder and the checkpoint to resume from
_WORKER_CMD = "from ganlab.ddp import worker_main; worker_main()"
_SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_ENV = "GANLAB_DDP_TIMEOUT_S"  # seconds a collective may wait for the other ranks (default: Lightning's 30 min)
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "OMP_NUM_THREADS", WORKER_ENV)


def devices_per_node(trainer_cfg: Mapping[str, Any]) -> int:
    """Processes per node that ``trainer.devices`` asks for (``auto``: every CUDA GPU, else one)."""
    devices = trainer_cfg.get("devices", 1)
    if str(devices) == "auto":
        accelerator = str(trainer_cfg.get("accelerator", "auto"))
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    return int(devices)


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """Processes of the run: devices per node x nodes."""
    return devices_per_node(trainer_cfg) * int(trainer_cfg.get("num_nodes", 1))


def cluster_launched() -> bool:
    """Whether a cluster tool started every process of the run itself (SLURM tasks, torchrun)."""
    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def launch_rank(devices: int) -> int:
    """The global rank of this process as its launcher says (0 for a process the user started on the first node):
    SLURM's ``SLURM_PROCID``, torchrun's ``RANK``, else ``NODE_RANK x devices + LOCAL_RANK``."""
    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_PROCID", 0))
    if TorchElasticEnvironment.detect():
        return int(os.environ["RANK"])
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return node * devices + int(os.environ.get("LOCAL_RANK", 0))


class RankLauncher(_SubprocessScriptLauncher):
    """Starts local ranks 1..N-1 of this node as workers (not as copies of ``sys.argv``), watches them, and on
    :meth:`finish` waits for them and restores this process's environment.

    Args:
        payload: what a worker needs (:func:`worker_main`), JSON-encoded into :data:`WORKER_ENV`.
        on_failure: called with a one-line reason when a worker dies and this process has not ended 15 s later
            (rank 0 records the failure then; with gloo its next collective fails at once, with NCCL it may wait for
            the process group's timeout).
    """

    def __init__(
        self,
        cluster_environment: Any,
        num_processes: int,
        num_nodes: int,
        payload: Mapping[str, Any],
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.payload, self.on_failure = dict(payload), on_failure
        self._saved_env: dict[str, str | None] = {}
        self._threads: int | None = None
        self._done = threading.Event()

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._saved_env = {k: os.environ.get(k) for k in _DIST_ENV}
            self._threads = torch.get_num_threads()
            self._call_children_scripts()
            threading.Thread(target=self._watch, name="ganlab-ddp-watch", daemon=True).start()
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.procs = []
        env = {
            **os.environ,
            "MASTER_ADDR": self.cluster_environment.main_address,
            "MASTER_PORT": str(self.cluster_environment.main_port),
            "NODE_RANK": str(self.cluster_environment.node_rank()),
            "WORLD_SIZE": str(self.num_processes * self.num_nodes),
            WORKER_ENV: json.dumps(self.payload),
            # the folder this ganlab is imported from (a checkout run as ``python src/train.py`` needs no install)
            "PYTHONPATH": os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p),
        }
        # rank 0's count, already split among the node's ranks (ganlab.pipeline.ranks_started_here), also where
        # OMP_NUM_THREADS was set: that is the cores of the whole job (a launcher's cpus_per_task), which the ranks
        # share; passed on unchanged, every worker would take all of them. Every rank trains with the count the run
        # records, and the workers' threads add up with rank 0's to the cores the job was given
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        for local_rank in range(1, self.num_processes):
            cmd = [sys.executable, "-c", _WORKER_CMD]
            self.procs.append(subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(local_rank)}))

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            if self.dead() is None:
                continue
            # the error usually reaches this process through the process group (gloo: the peer hung up): let rank 0
            # end on it and record it; only a rank still waiting after the grace period is stopped here
            if self._done.wait(15.0):
                return
            reason = f"{self.dead()}; the run cannot go on"
            print(f"error: {reason}", file=sys.stderr, flush=True)
            if self.on_failure is not None:
                self.on_failure(reason)
            self.kill(signal.SIGKILL)
            return

    def dead(self, wait_s: float = 0.0) -> str | None:
        """Which worker ended with an error, in words (None when none has); ``wait_s``: give them that long to end
        (a killed worker's sockets close a moment before its exit status can be read)."""
        deadline = time.monotonic() + wait_s
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        failed = [(i + 1, p.returncode) for i, p in enumerate(self.procs) if p.returncode not in (None, 0)]
        return f"DDP local rank {failed[0][0]} exited with code {failed[0][1]}" if failed else None

    def finish(self, ok: bool) -> list[int | None]:
        """After the fit: wait for the workers (they end with the same step; after an error of this process only,
        kill them: they may wait in a collective), restore the environment and thread count; return their exit
        codes."""
        self._done.set()
        deadline = time.monotonic() + (60.0 if ok else 5.0)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        return [p.returncode for p in self.procs]


class GANDDPStrategy(DDPStrategy):
    """Lightning's ``ddp`` without the ``DistributedDataParallel`` wrapper (why: the module docstring), with
    :class:`RankLauncher` for the processes this one starts, and the process group destroyed at teardown (so a
    second run in the same Python process starts a fresh one).

    Args:
        payload, on_failure: for :class:`RankLauncher`.
        **kwargs: :class:`~pytorch_lightning.strategies.DDPStrategy`'s (e.g. ``process_group_backend``); the
            collectives' ``timeout`` defaults to ``$GANLAB_DDP_TIMEOUT_S`` seconds when that is set.
    """

    def __init__(
        self, payload: Mapping[str, Any] | None = None, on_failure: Callable[[str], None] | None = None, **kwargs: Any
    ) -> None:
        if os.environ.get(TIMEOUT_ENV):
            kwargs.setdefault("timeout", timedelta(seconds=float(os.environ[TIMEOUT_ENV])))
        super().__init__(**kwargs)
        self.payload, self.on_failure = dict(payload or {}), on_failure

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = RankLauncher(
            self.cluster_environment, self.num_processes, self.num_nodes, self.payload, self.on_failure
        )

    def configure_ddp(self) -> None:
        # no wrapper; every rank starts from rank 0's parameters and persistent buffers, as DDP's constructor does
        # (the data pools, non-persistent buffers, are the same on every rank and not sent)
        from ganlab.util import broadcast_

        model = self.model
        assert model is not None
        state = list(model.parameters())
        for module in model.modules():
            skip = module._non_persistent_buffers_set
            state += [b for name, b in module._buffers.items() if b is not None and name not in skip]
        broadcast_(state)

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def worker_main() -> None:
    """A local rank > 0 started by :class:`RankLauncher`: train with the run's config, write nothing. It exits 0 when
    the run stops together (completed, interrupted, diverged: rank 0 records it) and 1 on an error of its own."""
    from omegaconf import OmegaConf

    from ganlab.errors import RunStopped
    from ganlab.pipeline import train_rank

    _die_with_parent()
    payload = json.loads(os.environ[WORKER_ENV])
    cfg = OmegaConf.create(payload["config"])
    try:
        train_rank(cfg, payload["run_dir"], payload["resume"])
    except RunStopped:
        sys.exit(0)


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when rank 0 dies (a SIGKILLed rank 0 must not leave workers waiting)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
