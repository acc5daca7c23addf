"""How many intra-op threads a run uses: ``model.threads`` = an integer, ``null`` (torch's default) or ``auto``.

``auto`` gives the run the cores nobody else is using when it starts. On 2 cores, torch's default of 2 threads is
the fastest choice alone but collapses beside one CPU-bound process: every parallel region waits for the thread
that shares its core with the other process (the default digits run keeps ~50 % of its speed, 1 thread ~75 %).
So ``auto`` measures, over a fraction of a second, how much of the run's cores *other* processes keep busy
(``/proc/stat`` summed over the cores this process may run on, less this process's own CPU time) and takes the
free ones, at least 1. An explicit ``OMP_NUM_THREADS`` (set by the sweep launcher, SLURM or the user) wins: the
caller already decided.

The count is chosen once, at the start, and stored in the checkpoint: floating-point reductions split differently
over different thread counts, so a count that changed mid-run would make a run depend on its neighbours' timing,
and a resume reuses the saved count to stay exact. A run that must repeat bit for bit on another machine or under
another load sets ``model.threads`` to a number.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

PROBE_S = 0.25  # how long auto watches the cores


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


def others_load(probe_s: float = PROBE_S) -> float | None:
    """How many of this process's cores other processes kept busy over ``probe_s`` seconds (None: unknown)."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:
        return None
    before, own_before = _cpu_jiffies(cpus), os.times()
    time.sleep(probe_s)
    after, own_after = _cpu_jiffies(cpus), os.times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    own = (own_after.user + own_after.system - own_before.user - own_before.system) * hz
    busy, total = after[0] - before[0] - own, after[1] - before[1]
    return max(0.0, busy / total * len(cpus))


def auto_threads(probe_s: float = PROBE_S, share: int = 1) -> int:
    """The thread count ``auto`` picks now: ``OMP_NUM_THREADS`` when set, else the cores others leave free,
    divided among the ``share`` processes of one run that this one starts on the node (DDP), at least 1 each."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = usable_cores()
    load = others_load(probe_s) if cores > 1 else None
    free = cores if load is None else max(1, min(cores, math.floor(cores - load + 0.5)))
    return max(1, free // max(1, share))


def resolve(setting: object, saved: int | None = None, share: int = 1) -> int | None:
    """The count for ``model.threads``: a number as given, ``auto`` measured (or ``saved``, a resumed run's count),
    None for torch's default; ``share`` processes of one run on this node (DDP) split the cores, so there None is
    the usable cores // share (as Lightning's launcher does) and ``auto`` the free ones // share."""
    if setting is None or setting == "":
        return None if share <= 1 else max(1, usable_cores() // share)
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
