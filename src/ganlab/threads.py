"""How many intra-op threads a run uses: ``model.threads`` = an integer, ``null`` (torch's default) or ``auto``.

``auto`` gives the run the cores nobody else is using, and keeps doing so while it trains. On 2 cores, torch's
default of 2 threads is the fastest choice alone but collapses beside one CPU-bound process: every parallel region
waits for the thread that shares its core with the other process (the default digits run keeps ~30 % of its speed,
1 thread ~60-75 % of the 2-thread rate). So ``auto`` measures, over a fraction of a second, how much of the run's
cores *other* processes keep busy (``/proc/stat`` summed over the cores this process may run on, less this
process's own CPU time) and takes the free ones, at least 1. During the run a :class:`Governor` looks again every
:data:`WINDOW_S` seconds (between generator steps): it drops a thread at once when another process takes a core,
and adds one back after two windows in a row found the core free. Because of that watch, ``auto`` lets OpenMP's
threads spin at barriers (torch's default, 10-43 % faster alone than sleeping ones here); a fixed count keeps them
sleeping (``OMP_WAIT_POLICY=PASSIVE``, :func:`wait_policy`), which is the better choice when nobody watches.
An explicit ``OMP_NUM_THREADS`` (set by the sweep launchers to a job's ``cpus_per_task``, by SLURM or by the user)
wins, and nothing is watched: the caller already decided how many cores this process gets. A DDP run that starts its
other ranks itself (``trainer.devices=N`` without SLURM tasks or torchrun) shares those cores with them: with ``auto``
or ``null`` each of its N processes takes ``max(1, OMP_NUM_THREADS // N)``, so the ranks' threads add up to the
cores the job was given (a number is per process, as given).

Floating-point reductions split differently over different thread counts, so the count a run uses shapes its last
bits. The run records every change (``summary.json``: ``threads`` at the start, ``thread_changes`` as
``[generator step, count]`` pairs) and its checkpoint the count in use, which a resume starts from. A run that must
repeat bit for bit on another machine or under another load sets ``model.threads`` to a number.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

PROBE_S = 0.25  # how long auto watches the cores at the start
WINDOW_S = 1.0  # how often the Governor looks again during a run
UP_WINDOWS = 2  # windows in a row that must find a core free before a thread is added back


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers, SLURM)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    """The cgroup's CPU quota in cores, or None when unlimited or unknown."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # v2: "<quota> <period>" or "max <period>"
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:  # v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat, or None where there is no /proc/stat."""
    busy = total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


# (busy, total) jiffies of the cores from /proc/stat, and this process's own CPU time in jiffies, at one moment
Mark = tuple[int, int, float]


def _mark(cpus: set[int]) -> Mark | None:
    jiffies = _cpu_jiffies(cpus)
    if jiffies is None:
        return None
    own = os.times()
    return (*jiffies, (own.user + own.system) * os.sysconf("SC_CLK_TCK"))


def _others(before: Mark | None, after: Mark | None, n_cpus: int) -> float | None:
    """How many of ``n_cpus`` cores other processes kept busy between two marks: the cores' busy time less this
    process's own (None: unknown)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy = after[0] - before[0] - (after[2] - before[2])
    return max(0.0, busy / (after[1] - before[1]) * n_cpus)


def others_load(probe_s: float = PROBE_S) -> float | None:
    """How many of this process's cores other processes kept busy over ``probe_s`` seconds (None: unknown)."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:
        return None
    before = _mark(cpus)
    time.sleep(probe_s)
    return _others(before, _mark(cpus), len(cpus))


def free_cores(cores: int, load: float) -> int:
    """The thread count for ``cores`` usable cores of which other processes keep ``load`` busy: the rest, rounded
    to the nearest core, at least 1."""
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` when set to a positive count (the cores the caller gave this process), else None."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def auto_threads(probe_s: float = PROBE_S, share: int = 1) -> int:
    """The thread count ``auto`` picks now: ``OMP_NUM_THREADS`` when set, else the cores others leave free; either
    divided among the ``share`` processes of one run that this one starts on the node (DDP), at least 1 each."""
    given = env_threads()
    if given is not None:
        return max(1, given // max(1, share))
    cores = usable_cores()
    load = others_load(probe_s) if cores > 1 else None
    free = cores if load is None else free_cores(cores, load)
    return max(1, free // max(1, share))


def resolve(setting: object, saved: int | None = None, share: int = 1) -> int | None:
    """The count for ``model.threads``: a number as given, ``auto`` measured (or ``saved``, a resumed run's count),
    None for torch's default; ``share`` processes of one run on this node (DDP) split the cores, so there None is
    ``OMP_NUM_THREADS`` (else the usable cores) // share, as Lightning's launcher does, and ``auto`` the
    ``OMP_NUM_THREADS`` or free cores // share."""
    if setting is None or setting == "":
        return None if share <= 1 else max(1, (env_threads() or usable_cores()) // share)
    if str(setting) == "auto":
        return int(saved) if saved else auto_threads(share=share)
    return int(setting)  # type: ignore[call-overload]


def apply(setting: object, saved: int | None = None, share: int = 1) -> int:
    """Set torch's intra-op threads from ``model.threads`` (see :func:`resolve`); returns the count in use."""
    import torch  # here: the sweep launcher imports this module at Hydra's start, before any run needs torch

    threads = resolve(setting, saved, share)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def governed(setting: object) -> bool:
    """Whether a run with ``model.threads`` = ``setting`` is watched by a :class:`Governor`: ``auto`` where no
    ``OMP_NUM_THREADS`` decided the count (a one-process CPU run; :class:`ganlab.callbacks.ThreadGovernor` checks
    that part when training starts)."""
    return str(setting) == "auto" and not os.environ.get("OMP_NUM_THREADS", "").strip()


def wait_policy(setting: object) -> None:
    """Before torch starts its OpenMP pool (OpenMP reads the variable once, then): threads that sleep at barriers
    (``OMP_WAIT_POLICY=PASSIVE``) unless the run is :func:`governed`, where the :class:`Governor` takes a thread
    away when another process takes a core, and spinning threads are faster. A policy the user set is kept. It
    changes no result (the same threads split the same work)."""
    if not governed(setting):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class Governor:
    """``model.threads=auto`` during a run: every ``window_s`` seconds (checked by :meth:`poll` between generator
    steps, one clock read; a look is one read of ``/proc/stat``) it measures how many of the ``cores`` other
    processes kept busy over the window and returns a new thread count when that changed what is free.

    Fewer threads at once: two spinning threads beside a CPU-bound process run at about a third of their speed.
    More only after :data:`UP_WINDOWS` windows in a row found the cores free: one thread too few costs a quarter
    to a third of the speed, and a neighbour's short pause should not bring the collapse back."""

    def __init__(self, threads: int, cores: int | None = None, window_s: float = WINDOW_S) -> None:
        self.threads, self.cores, self.window_s = threads, cores or usable_cores(), window_s
        try:
            self._cpus: set[int] | None = set(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows: no /proc/stat either; the count stays as it started
            self._cpus = None
        self._last: tuple[float, Mark | None] | None = None  # the clock and the mark of the last look
        self._up = 0  # windows in a row that found more cores free than threads in use

    def decide(self, load: float) -> int:
        """The count after a window in which other processes kept ``load`` cores busy (and remember it)."""
        free = free_cores(self.cores, load)
        self._up = self._up + 1 if free > self.threads else 0
        if free < self.threads or self._up >= UP_WINDOWS:
            self.threads, self._up = free, 0
        return self.threads

    def poll(self) -> int | None:
        """The new thread count when a window just ended and its look changed it, else None."""
        clock = time.perf_counter()
        if self._last is not None and clock - self._last[0] < self.window_s:
            return None
        mark = _mark(self._cpus) if self._cpus else None
        before, self._last = self._last, (clock, mark)
        load = _others(before[1] if before else None, mark, len(self._cpus or ()))
        if load is None:
            return None
        old = self.threads
        return new if (new := self.decide(load)) != old else None
