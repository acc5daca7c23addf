"""Every command the README shows runs (at a tiny budget), so a published command cannot rot silently.

Commands are read from the README itself: ``python src/<script>.py ...`` and ``python -m ganlab...`` lines in code
blocks and inline code. Each training command is composed exactly as Hydra would compose it and trained for two
generator steps; a multirun composes its last job and trains its first (test_sweeps.py composes every combination
of every recipe); a report runs, without figures, on the runs this test made; the benchmark's flags parse
(test_bench.py runs it); commands that need the network (CIFAR-10, MNIST) or name a placeholder folder must fail
with their one-line reason.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import CONF, ROOT
from ganlab.errors import UserError
from ganlab.pipeline import train

README = ROOT / "README.md"
# a budget every command can run at (the command's own keys come first, these win)
TINY = [
    "max_steps=2",
    "log_every=1",
    "sample_every=2",
    "ckpt_every=2",
    "logger=csv",
    "metrics.eval_every=2",
    "metrics.n_samples=400",
]
_COMMAND = re.compile(r"python (?:src/\w+\.py|-m ganlab[\w.]*)(?: [^`\n]*)?")
_INSTALLED = re.compile(r"^(ganlab-(?:train|eval|generate|report))\b(.*)$")  # console scripts, in code blocks
_SCRIPT = {"ganlab-train": "src/train.py", "ganlab-eval": "src/eval.py", "ganlab-generate": "src/generate.py",
           "ganlab-report": "src/report.py"}  # fmt: skip


def readme_commands() -> list[str]:
    """Every distinct command of the README, comments and pipes stripped, in order; an installed command
    (``ganlab-eval ...`` in a code block) is the checkout's script with the same arguments."""
    found: list[str] = []
    in_block = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        candidates = [m.group(0) for m in _COMMAND.finditer(line)]
        installed = _INSTALLED.match(line.strip()) if in_block else None
        if installed:
            candidates.append(f"python {_SCRIPT[installed.group(1)]}{installed.group(2)}")
        for text in candidates:
            cmd = re.split(r"\s+#|\s*\|\s", text)[0].strip().rstrip("`")
            if cmd not in found:
                found.append(cmd)
    return found


COMMANDS = readme_commands()
NEEDS_NETWORK = ("data=cifar10", "data=mnist", "data=stacked_mnist")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun, expanded as Hydra's basic sweeper does (recipe axes, then the command line's)."""
    fixed = [o for o in overrides if not re.search(r",|range\(|choice\(", o.split("=", 1)[-1])]
    params = _compose(fixed).hydra.sweeper.params or {}
    recipe = [f"{k}={v}" for k, v in params.items()]
    parsed = OverridesParser.create().parse_overrides([*recipe, *overrides])
    return BasicSweeper.split_arguments(parsed, None)[0]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _train_tiny(overrides: list[str], run_dir: Path) -> dict:
    """Train the command's config for two generator steps: its own budget keys give way to TINY's."""
    tiny_keys = {_key(t) for t in TINY}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*(o for o in overrides if _key(o) not in tiny_keys), *TINY])
    return train(cfg, run_dir)


@functools.cache
def _tiny_sweep() -> Path:
    root = Path(tempfile.mkdtemp(prefix="readme-sweep-"))
    for seed in (0, 1):
        _train_tiny(["data=ring8", f"seed={seed}"], root / f"{seed}")
    return root


def test_the_readme_shows_the_commands_this_test_knows() -> None:
    scripts = {shlex.split(c)[1] for c in COMMANDS}
    assert {"src/train.py", "src/report.py"} <= scripts
    assert any(" -m " in f" {c} " for c in COMMANDS)  # at least one sweep


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_runs(command: str, tmp_path: Path) -> None:
    argv = shlex.split(command)[1:]
    script, args = argv[0], argv[1:]
    if script == "-m":  # python -m ganlab.<module>
        if args[0] == "ganlab.bench":  # its flags must parse; test_bench.py runs the table itself (minutes here)
            from ganlab import bench

            bench.parser().parse_args(args[1:])  # an unknown flag or setting exits non-zero
            return
        from ganlab.metrics.classifier import main  # retrains the shipped CNN: its command line must parse

        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        return
    if script == "src/report.py":
        from ganlab.report import main

        runs = tmp_path / "sweep"
        shutil.copytree(_tiny_sweep(), runs)  # two tiny runs, trained once for every report command
        flags = [a for a in args if a.startswith("-")]  # the folder (a placeholder) becomes this test's sweep
        # no figures (seconds of matplotlib per command): test_sweeps.py checks the plots a report draws
        assert main([str(runs), *flags, "--no-plots"]) == 0
        assert (runs / "report.md").is_file()
        return
    if script in ("src/eval.py", "src/generate.py"):
        _run_on_a_saved_model(script, args, tmp_path)
        return
    assert script == "src/train.py", command
    if "--cfg" in args:  # prints a config, trains nothing: it must compose
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        assert _compose(overrides) is not None
        return
    multirun = "-m" in args
    overrides = [a for a in args if a != "-m"]
    if any(n in command for n in NEEDS_NETWORK):
        with pytest.raises(UserError, match=r"download|not found|no such|manually|missing"):
            _train_tiny(overrides, tmp_path / "run")
        return
    if any(a.startswith("resume=") for a in overrides):  # a placeholder folder: refused in one line
        with pytest.raises(UserError, match="resume"):
            _train_tiny(overrides, tmp_path / "run")
        return
    if any(a.startswith("trainer.devices=") for a in overrides):  # DDP: tests/test_ddp.py trains it (2 processes)
        assert _compose(overrides).trainer.devices not in (None, 1)
        return
    jobs = _jobs(overrides) if multirun else [overrides]
    assert jobs, command
    # the last job composes (test_sweeps.py composes every combination of every recipe) and the first one trains
    _compose(jobs[-1])
    summary = _train_tiny(jobs[0], tmp_path / "run")
    assert summary["status"] == "completed" and summary["g_steps"] == 2, command


def _run_on_a_saved_model(script: str, args: list[str], tmp_path: Path) -> None:
    """``src/eval.py`` / ``src/generate.py`` on a run this test trains (its data set from the placeholder's name):
    the placeholder becomes the run (or its checkpoint), large sample counts a small one."""
    target, options = args[0], args[1:]
    data = "ring8" if "ring8" in target else "digits"
    run = tmp_path / "saved"
    _train_tiny([f"data={data}"], run)
    path = run / "checkpoints" / "last.ckpt" if target.endswith(".ckpt") else run
    options = [re.sub(r"^(metrics\.n_samples)=\d+$", r"\1=400", o) for o in options]
    options = [re.sub(r"^n=\d+$", "n=64", o) for o in options]
    options = [f"out={tmp_path / 'generated'}" if o.startswith("out=") else o for o in options]
    if script == "src/eval.py":
        from ganlab.evaluate import main
    else:
        from ganlab.generate import main
    assert main([str(path), *options]) == 0
