"""``model.threads=auto``: the cores other processes leave free when a run starts and while it trains (the governor),
recorded and kept across a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, compose_cfg
from ganlab import threads
from ganlab.pipeline import train


def test_resolve_takes_numbers_as_given_and_auto_from_the_env_or_a_saved_count(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve(None) is None and threads.resolve(4) == 4 and threads.resolve("2") == 2
    assert threads.resolve("auto") == 3  # the launcher's (or SLURM's, or the user's) choice wins
    assert threads.resolve("auto", saved=1) == 1  # a resumed run keeps the count it trained with


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 1.9, 1), (4, 1.0, 3), (4, 2.2, 2), (8, 0.05, 8)],
)
def test_auto_takes_the_cores_others_leave_free_and_at_least_one(monkeypatch, cores, load, expected) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "others_load", lambda probe_s=0.0: load)
    assert threads.auto_threads() == expected


@pytest.mark.parametrize(
    ("cores", "load", "share", "expected"),
    [(4, 0.0, 2, 2), (4, 1.0, 2, 1), (2, 0.0, 2, 1), (2, 1.9, 2, 1), (16, 0.0, 4, 4), (8, 0.0, 3, 2)],
)
def test_auto_splits_the_free_cores_among_the_ranks_a_run_starts_on_the_node(
    monkeypatch, cores, load, share, expected
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "others_load", lambda probe_s=0.0: load)
    assert threads.resolve("auto", share=share) == expected
    assert threads.resolve(None, share=share) == max(1, cores // share)  # torch's default would take them all
    assert threads.resolve(None) is None and threads.resolve(3, share=share) == 3  # a number is per process
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the cores the caller gave this process: its ranks share them
    assert threads.resolve("auto", share=share) == threads.resolve(None, share=share) == max(1, 5 // share)
    assert threads.resolve("auto") == 5 and threads.resolve(None) is None  # one process: the caller's count


@pytest.mark.parametrize(
    ("omp", "share", "expected"), [("2", 2, 1), ("1", 2, 1), ("4", 2, 2), ("6", 4, 1), ("2", 1, 2)]
)
def test_omp_num_threads_is_the_job_s_cores_which_the_ranks_it_starts_here_share(
    monkeypatch, omp, share, expected
) -> None:
    # a local-launcher job of cpus_per_task=2 running trainer.devices=2: 1 thread per rank, 2 on its 2 cores (not 4)
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)  # the machine's cores are not the job's
    assert threads.auto_threads(share=share) == expected
    assert threads.resolve("auto", share=share) == expected
    assert threads.resolve(3, share=share) == 3  # a number is per process, as given


def test_a_run_splits_its_threads_only_among_ranks_it_starts_itself(monkeypatch) -> None:
    from ganlab.pipeline import ranks_started_here

    for var in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert ranks_started_here(compose_cfg(TINY)) == 1
    assert ranks_started_here(compose_cfg([*TINY, "trainer.devices=3"])) == 3
    assert ranks_started_here(compose_cfg([*TINY, "trainer.devices=2", "trainer.num_nodes=2"])) == 2


def test_others_load_subtracts_this_process_own_cpu_time(monkeypatch) -> None:
    # over the window the two cores were busy 150 of 200 jiffies; 50 of them (0.5 s at HZ=100) were this process
    samples = iter([(100, 1000), (250, 1200)])
    times = iter([SimpleNamespace(user=1.0, system=0.25), SimpleNamespace(user=1.4, system=0.35)])
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "_cpu_jiffies", lambda cpus: next(samples))
    monkeypatch.setattr(threads.os, "times", lambda: next(times))
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.others_load() == pytest.approx((150 - 50) / 200 * 2)


def test_cpu_jiffies_reads_only_this_process_cores(monkeypatch, tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 30 30 0 0 0 0 0 0\n"
        "cpu0 10 0 10 10 5 0 0 0 0 0\n"  # busy 20 of 35 (iowait counts as idle)
        "cpu1 20 0 20 20 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    real = Path

    monkeypatch.setattr(threads, "Path", lambda p: real(stat) if p == "/proc/stat" else real(p))
    assert threads._cpu_jiffies({0}) == (20, 35)
    assert threads._cpu_jiffies({0, 1}) == (60, 95)


@pytest.mark.skipif(threads.usable_cores() < 2 or not Path("/proc/stat").exists(), reason="needs 2 cores, Linux")
def test_beside_a_cpu_bound_process_auto_leaves_it_its_core(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        threads.others_load(0.3)  # let it start
        load = threads.others_load(0.5)
        auto = threads.auto_threads(0.5)
    finally:
        hog.kill()
        hog.wait()
    assert load >= 0.8, load
    assert auto <= threads.usable_cores() - 1


def test_a_run_records_its_auto_count_and_a_resume_keeps_it(tmp_path: Path, monkeypatch) -> None:
    before = torch.get_num_threads()
    common = [*TINY, "model.threads=auto", "ckpt_every=2", "model.lr_decay=none"]
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        first = train(compose_cfg([*common, "max_steps=2"]), tmp_path / "run")
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the machine changed; the run's reductions must not
        train(compose_cfg([*common, "max_steps=4", "resume=auto"]), tmp_path / "run")
        resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
        fresh = train(compose_cfg([*common, "max_steps=2"]), tmp_path / "fresh")
    finally:
        torch.set_num_threads(before)
    assert first["threads"] == 1 and ckpt["ganlab"]["threads"] == 1
    assert resumed["threads"] == 1 and resumed["g_steps"] == 4
    assert fresh["threads"] == 2


def test_bad_thread_settings_are_refused(tmp_path: Path) -> None:
    from ganlab.errors import UserError

    for bad in ("model.threads=0", "model.threads=many"):
        with pytest.raises(UserError, match=r"model\.threads"):
            train(compose_cfg([*TINY, bad, "max_steps=2"]), tmp_path / bad.replace("=", "_"))


def test_usable_cores_respects_a_cgroup_quota(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 cores
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "Path", lambda p: tmp_path / ("cpu.max" if p.endswith("cpu.max") else "absent"))
    assert threads.usable_cores() == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")  # unlimited: the affinity decides
    assert threads.usable_cores() == 4


@pytest.mark.parametrize(
    ("nvml_gpus", "before", "after"), [(-1, "1", "0"), (0, "1", "0"), (2, "1", "1"), (0, None, None)]
)
def test_the_nvml_cuda_check_is_turned_off_only_where_nvml_finds_no_gpu(monkeypatch, nvml_gpus, before, after) -> None:
    # Lightning sets the NVML check; where there is no GPU it makes every Adam step load NVML again
    from ganlab import pipeline

    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: nvml_gpus)
    if before is None:
        monkeypatch.delenv(pipeline.NVML_CHECK, raising=False)
    else:
        monkeypatch.setenv(pipeline.NVML_CHECK, before)
    assert pipeline.cheap_cuda_check() is (before != after)
    assert os.environ.get(pipeline.NVML_CHECK) == after


def test_importing_the_pipeline_here_leaves_torch_s_cuda_check_cheap() -> None:
    import ganlab.pipeline  # noqa: F401  (imports Lightning, which sets the NVML check)

    if torch.cuda._device_count_nvml() <= 0:
        assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "0"
        assert not torch.cuda.is_available()


def test_the_governor_drops_a_thread_at_once_and_adds_one_back_after_two_quiet_windows() -> None:
    gov = threads.Governor(2, cores=2)
    # others' load per window: a neighbour comes (0.65: two spinning threads leave it 2/3 of a core), stays (1.0,
    # with one thread left to us), pauses for one window, comes back, then leaves for good
    loads = [0.0, 0.65, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [gov.decide(load) for load in loads] == [2, 1, 1, 1, 1, 1, 2, 2]
    gov = threads.Governor(4, cores=4)
    assert [gov.decide(load) for load in [2.6, 0.3, 0.3, 3.9]] == [1, 1, 4, 1]  # never below one thread


def test_the_governor_looks_once_a_window_and_subtracts_its_own_cpu_time(monkeypatch) -> None:
    clock = iter([0.0, 0.5, 1.2, 1.3, 2.5])
    # /proc/stat over both cores (busy, total) and this process's CPU seconds at each look (HZ = 100)
    jiffies = iter([(100, 1000), (290, 1200), (480, 1400)])
    own = iter([SimpleNamespace(user=1.0, system=0.0), SimpleNamespace(user=2.5, system=0.1),
                SimpleNamespace(user=2.9, system=0.1)])  # fmt: skip
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "_cpu_jiffies", lambda cpus: next(jiffies))
    monkeypatch.setattr(threads.os, "times", lambda: next(own))
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(threads.time, "perf_counter", lambda: next(clock))
    gov = threads.Governor(2, cores=2, window_s=1.0)
    assert gov.poll() is None  # t=0: the first look only marks the start
    assert gov.poll() is None  # t=0.5: inside the window, nothing read
    # t=1.2: the cores were busy 190 of 200 jiffies, 160 of them this process's own: others kept
    # (190 - 160) / 200 x 2 = 0.3 cores busy, so both threads stay
    assert gov.poll() is None and gov.threads == 2
    assert gov.poll() is None  # t=1.3
    # t=2.5: others (190 - 40) / 200 x 2 = 1.5 cores: one thread left
    assert gov.poll() == 1 and gov.threads == 1


@pytest.mark.skipif(threads.usable_cores() < 2 or not Path("/proc/stat").exists(), reason="needs 2 cores, Linux")
def test_the_governor_sees_a_cpu_bound_process_that_starts_during_the_run() -> None:
    gov = threads.Governor(2, cores=2, window_s=0.5)
    gov.poll()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        changed = None
        for _ in range(4):  # the first window may end before the neighbour runs
            time.sleep(0.6)
            changed = gov.poll() or changed
    finally:
        hog.kill()
        hog.wait()
    assert changed == 1 and gov.threads == 1


def test_the_wait_policy_spins_only_where_the_governor_watches(monkeypatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # recorded, so the value wait_policy sets below is undone after
    for setting, omp, user, expected in [
        ("auto", None, None, None),  # governed: OpenMP's spinning threads
        ("auto", "1", None, "PASSIVE"),  # the launcher decided: nobody watches
        (2, None, None, "PASSIVE"),
        (None, None, None, "PASSIVE"),
        (2, None, "ACTIVE", "ACTIVE"),  # the user's policy stays
    ]:
        for var, value in (("OMP_NUM_THREADS", omp), ("OMP_WAIT_POLICY", user)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
        threads.wait_policy(setting)
        assert os.environ.get("OMP_WAIT_POLICY") == expected, (setting, omp, user)


class _Scripted:
    """A stand-in for the governor: one change to 1 thread at its third look in this test, then none."""

    looks = 0

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def poll(self) -> int | None:
        _Scripted.looks += 1
        return 1 if _Scripted.looks == 3 else None


def test_a_governed_run_records_each_change_and_a_resume_starts_from_the_count_in_use(
    tmp_path: Path, monkeypatch
) -> None:
    from ganlab import callbacks

    monkeypatch.setattr(callbacks, "Governor", _Scripted)
    _Scripted.looks = 0  # the script counts from this test's first look
    monkeypatch.setattr(threads, "others_load", lambda probe_s=0.0: 0.0)  # a quiet machine at the start
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    common = [*TINY, "model.threads=auto", "ckpt_every=2", "model.steps_per_call=1", "model.lr_decay=none"]
    seen: list[int] = []
    try:
        first = train(compose_cfg([*common, "max_steps=6"]), tmp_path / "run")
        ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
        torch.set_num_threads(2)  # the resume must take the checkpoint's count, not the process's
        monkeypatch.setattr(threads, "others_load", lambda probe_s=0.0: (seen.append(1), 0.0)[1])
        resumed = train(compose_cfg([*common, "max_steps=8", "resume=auto"]), tmp_path / "run")
        in_use = torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # decided by the caller: no governor
        fixed = train(compose_cfg([*common, "max_steps=4"]), tmp_path / "fixed")
        # resumed on a fixed count other than its checkpoint's (unwatched): the earlier changes stay, this one is added
        fixed_count = [*(o for o in common if not o.startswith("model.threads")), "model.threads=2"]
        again = train(compose_cfg([*fixed_count, "max_steps=10", "resume=auto"]), tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert first["threads"] == threads.usable_cores() and first["thread_changes"] == [[3, 1]]
    assert ckpt["ganlab"]["threads"] == 1
    assert [state["changes"] for key, state in ckpt["callbacks"].items() if "ThreadGovernor" in key] == [[[3, 1]]]
    assert resumed["threads"] == 1 and in_use == 1 and not seen  # no new look at the start: the saved count
    assert resumed["thread_changes"] == [[3, 1]] and resumed["g_steps"] == 8
    assert fixed["thread_changes"] == [] and fixed["threads"] == 2
    assert again["thread_changes"] == [[3, 1], [8, 2]] and again["threads"] == 2 and again["g_steps"] == 10
