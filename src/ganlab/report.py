"""Compare the arms of a sweep from its run folders alone: ``python src/report.py outputs/multirun/<date>/<time>``.

Every folder below the given one that holds a ``summary.json`` (or a Hydra job folder that never got that far) is
one run. Runs are grouped by data set (one table each) and by arm: the G objective (``choices.loss``) plus any
other override that differs between the runs of that data set (``tricks=[...]``, ``d_steps=5``, ...), so runs
that are not comparable never share a row; the seed is what varies within a row. Each final metric is reported as
mean ± the half-width of a 95 % Student-t confidence interval over seeds. Arms appear in the order the sweep ran
them (job numbers). Columns are split into *results* (the evaluation metrics, each marked with its better direction:
↑ or ↓) and *diagnostics* (D's view of the equilibrium, losses, gradient norms); learning rates and timings are not
metrics and are left out. Arms run on the same seeds are also compared seed by seed with a baseline arm
(``--baseline``, ``non_saturating`` by default): the mean paired difference and its 95 % Student-t interval.

A run's ``evals/*.json`` (written by ``src/eval.py``) add their metrics to the run's own under their own names
(``fid50k``...); the training's final values win a name both hold. A Hydra sweep folder's ``multirun.yaml`` lists
every job the sweep launched: a job without a finished run is reported as pending (no folder yet), running or failed.

Written into the given folder: ``report.md`` (tables, failed runs, plots), ``report.json`` (the same numbers),
``plots/<data>/<metric>.png`` (each metric against the generator step, mean line and min–max band over seeds),
``plots/<data>/curves.png`` (all metrics at a glance) and ``plots/<data>/samples.png`` (the final samples of each
arm and seed; whether those are image grids, 2-D scatters or 1-D density plots is read from each run's record,
``summary.json``'s ``data.preview``, never from the data set's name). W&B is not needed: only the run folders are
read.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ganlab.record import write_text

# what each preview kind (the data set's declaration, recorded in summary.json's ``data.preview``) shows
PREVIEW_CAPTIONS = {
    "grid": "final sample grids",
    "scatter": "final samples, scattered over the real data",
    "density": "final p_g against p_data, with D(x)",
}
# the arm the paired comparisons are made against when --baseline is not given
DEFAULT_BASELINE = "non_saturating"
# results: evaluation metrics and their better direction (first match wins); the protocol suffix (2k, 2500) follows
RESULT_DIRECTIONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), arrow)
    for pattern, arrow in (
        (r"^fid\d", "↓"),
        (r"^kid\d+k?$", "↓"),
        (r"^is\d+k?$", "↑"),
        (r"^precision\d", "↑"),
        (r"^recall\d", "↑"),
        (r"^(stacked_)?modes\d", "↑"),
        (r"^hq_fraction\d", "↑"),
        (r"^(reverse|stacked)_kl\d", "↓"),
        (r"^ssl/test_errors?$", "↓"),
    )
)
# diagnostics whose ideal is the equilibrium: D fooled, D(x) = D(G(z)) = 1/2
_EQUILIBRIUM = re.compile(r"^(eval/)?(D\(x(_test)?\)|D\(G\(z\)\)|d_accuracy)$")
# not metrics at all: learning rates (a schedule), timings and step counters
_NOT_A_METRIC = re.compile(r"^(lr/|step/|epoch$|eval/seconds$|.*_time_s$)")
# override keys that never distinguish arms: the seed is what a row averages over, data makes the table, loss is
# the arm itself, resume and the sweep recipe only say how the run was launched, and the logger and the log, sample
# and checkpoint cadences only how often it recorded (none of them changes what it trained)
_NOT_AN_ARM = re.compile(r"^(seed|data|loss|resume|sweep|hydra\b.*|logger(\..*)?|log_every|sample_every|ckpt_every)$")
# keys a run resolves itself when the config leaves them null (the data set's default) and records in summary.json
_RESOLVED = ("batch_size", "d_steps")
# training scalars (logged every log_every steps); anything else in ``final`` is an evaluation metric
_TRAINING_SCALAR = re.compile(r"^(loss/|grad_norm/|D\(|lr/)")
# metrics.csv columns that are counters, not metrics
_CSV_COUNTERS = frozenset({"step", "step/g", "step/d", "epoch"})
# job folders of the submitit launcher and W&B files hold no runs
_SKIP_DIRS = frozenset({".submitit", "wandb", "checkpoints", "samples", "plots"})


class ReportError(Exception):
    """Bad input (missing folder, no runs): reported as one line, exit code 2."""


@dataclass
class Run:
    """One run folder as the report sees it."""

    path: Path
    data: str
    loss: str
    seed: Any
    overrides: dict[str, str]
    status: str
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    preview: str | None = None  # the data set's preview kind from summary.json (None: not recorded)
    variant: tuple[str, ...] = ()  # overrides besides loss that set this run's arm apart (filled by group_runs)
    trained: dict[str, Any] = field(default_factory=dict)  # the config it trained with (trained_with)
    job_num: int | None = None  # the job's number in its Hydra sweep (None: not a Hydra sweep job)
    params: dict[str, int] = field(default_factory=dict)  # the nets' parameter counts ({"g": .., "d": ..})

    @property
    def arm(self) -> str:
        """Row label: the G objective, then the overrides that distinguish this arm."""
        return " ".join([self.loss, *self.variant])

    @property
    def problem(self) -> str | None:
        """Why this run is left out of the means (None: it counts)."""
        if self.status != "completed":
            how = "still running, or killed" if self.status == "running" else self.status
            return f"{how}: {self.error}" if self.error else how
        bad = {k: v for k, v in self.metrics.items() if not math.isfinite(v)}
        if bad:
            return "diverged: non-finite final " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        return None


# ----------------------------------------------------------------------------------------------- reading runs


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def _final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``final`` merged with the ``eval`` and ``metrics`` dicts older or newer summaries may carry."""
    merged: dict[str, float] = {}
    for key in ("metrics", "eval", "final"):  # later wins: ``final`` is the contract
        block = summary.get(key)
        if not isinstance(block, Mapping):
            continue
        for name, value in block.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # a string or nested dict is not a number to average
            merged[str(name)] = float(value)
    return merged


def load_run(summary_path: Path) -> Run:
    """Read one ``summary.json`` (an unreadable one becomes a failed run, never an exception)."""
    folder = summary_path.parent
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        run = _run_without_summary(folder)
        run.status, run.error = "failed", f"unreadable summary.json ({exc.__class__.__name__}: {exc})"
        return run
    choices = summary.get("choices") or {}
    overrides = dict(_split_override(o) for o in summary.get("overrides") or [])
    return Run(
        path=folder,
        data=str(choices.get("data") or overrides.get("data") or "?"),
        loss=str(choices.get("loss") or overrides.get("loss") or "?"),
        seed=summary.get("seed", overrides.get("seed")),
        overrides=overrides,
        status=str(summary.get("status", "unknown")),
        error=summary.get("error"),
        # the training's values win a shared name
        metrics={**eval_metrics(folder, summary.get("g_steps")), **_final_metrics(summary)},
        preview=_recorded_preview(summary),
        job_num=summary.get("job_num"),
        trained=trained_with(folder, summary),
        params={k.split("/", 1)[1]: int(v) for k, v in summary.items() if k.startswith("params/") and _count(v)},
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _span(counts: Sequence[int]) -> str:
    """Sorted counts as one cell: ``198,589``, or ``133,889–198,589`` when the runs differ, ``—`` for none."""
    if not counts:
        return "—"
    return f"{counts[0]:,}" if counts[0] == counts[-1] else f"{counts[0]:,}–{counts[-1]:,}"


def _value_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def trained_with(run_dir: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` with ``batch_size`` and ``d_steps`` at the values the run resolved
    (``summary.json``); {} without one. Read by :func:`_trained_value`.

    An arm is what its runs trained with: ``max_steps=10000`` on the command line and in a recipe's body, or
    ``batch_size=512`` and ``null`` resolved to 512, are the same setting."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    config = config if isinstance(config, dict) else {}
    for key in _RESOLVED:  # older records lack the resolved value: the config's stands
        value = summary.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            config[key] = value
    return config


def _trained_value(run: Run, key: str) -> str | None:
    """The value at dotted ``key`` the run trained with, as text; else the override's text; None if neither."""
    node: Any = run.trained
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return run.overrides.get(key)
        node = node[part]
    return _value_text(node)


def eval_metrics(run_dir: Path, g_step: Any = None) -> dict[str, float]:
    """The metrics of the run's later evaluations (``evals/*.json`` from ``src/eval.py``) of its final checkpoint,
    the one at generator step ``g_step`` (the summary's ``g_steps``): an evaluation of an earlier checkpoint (the
    run was extended since) is not the run's result. Oldest file first, so a newer evaluation of the same protocol
    wins."""
    merged: dict[str, float] = {}
    files = [p for p in (run_dir / "evals").glob("*.json") if p.name != "index.json"]
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        try:
            entry = json.loads(path.read_text())
            block = entry.get("metrics") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if g_step is not None and entry.get("g_step") != g_step:
            continue
        merged.update(_final_metrics({"final": block}))
    return merged


def _recorded_preview(summary: Mapping[str, Any]) -> str | None:
    """``summary["data"]["preview"]`` (what ``ganlab.data.describe`` wrote), or None when absent or unknown."""
    data = summary.get("data")
    preview = data.get("preview") if isinstance(data, Mapping) else None
    return preview if preview in PREVIEW_CAPTIONS else None


def dataset_preview(runs: Iterable[Run]) -> str:
    """The preview kind of a data set's runs: the first one recorded, ``"grid"`` when none was (older runs)."""
    return next((r.preview for r in runs if r.preview is not None), "grid")


def _run_without_summary(folder: Path) -> Run:
    """A Hydra job folder with no (readable) summary.json: identity from Hydra's own records."""
    import yaml

    overrides: dict[str, str] = {}
    choices: dict[str, Any] = {}
    hydra_cfg: Any = None
    try:
        overrides = dict(_split_override(o) for o in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()))
        hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())
        choices = hydra_cfg["hydra"]["runtime"]["choices"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    seed = overrides.get("seed")
    job_num = hydra_cfg.get("hydra", {}).get("job", {}).get("num") if isinstance(hydra_cfg, dict) else None
    return Run(
        path=folder,
        data=str(choices.get("data") or overrides.get("data") or "?"),
        loss=str(choices.get("loss") or overrides.get("loss") or "?"),
        seed=int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed,
        overrides=overrides,
        status="failed",
        error="no summary.json: the job stopped before training started (see its log in the folder or .submitit/)",
        job_num=job_num if isinstance(job_num, int) else None,
    )


def _walk(root: Path) -> Iterable[Path]:
    """Run folders below ``root``: those with a summary.json or a Hydra ``.hydra/`` record."""
    stack = [root]
    while stack:
        folder = stack.pop()
        if (folder / "summary.json").is_file() or (folder / ".hydra" / "overrides.yaml").is_file():
            yield folder
            continue  # a run folder holds no further runs
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS)
        except OSError:
            continue
        stack.extend(reversed(children))


def find_runs(root: Path) -> list[Run]:
    """Every run below ``root`` (recursively), in folder order."""
    runs = []
    for folder in _walk(root):
        summary = folder / "summary.json"
        runs.append(load_run(summary) if summary.is_file() else _run_without_summary(folder))
    return runs


def group_runs(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    """``{data: {arm: [runs]}}``; sets each run's ``variant`` to the overrides that differ within its data set."""
    by_data: dict[str, list[Run]] = {}
    for run in runs:
        by_data.setdefault(run.data, []).append(run)
    grouped: dict[str, dict[str, list[Run]]] = {}
    for data, members in sorted(by_data.items()):
        keys = {k for r in members for k in r.overrides if not _NOT_AN_ARM.match(k)}
        # an override is part of the arm only if the runs trained with more than one value of it (or one is unknown)
        varying = sorted(k for k in keys if len({_trained_value(r, k) for r in members}) > 1)
        for run in members:
            run.variant = tuple(
                f"{k}={run.overrides[k] if k in run.overrides else _trained_value(run, k)}"
                for k in varying
                if _trained_value(run, k) is not None
            )
        arms: dict[str, list[Run]] = {}
        # arms in the order the sweep ran them: by their first job number, else by their first folder
        for _, run in sorted(enumerate(members), key=lambda item: _run_order(*item)):
            arms.setdefault(run.arm, []).append(run)
        grouped[data] = {arm: sorted(rs, key=_seed_key) for arm, rs in arms.items()}
    return grouped


def _run_order(position: int, run: Run) -> tuple:
    return (0, run.job_num, position) if isinstance(run.job_num, int) else (1, 0, position)


def _seed_key(run: Run) -> tuple:
    return (0, run.seed, "") if isinstance(run.seed, int) else (1, 0, str(run.seed))


# ----------------------------------------------------------------------------------------------- statistics


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95 % Student-t half-width ``t(0.975, n-1) * s / sqrt(n)``.

    With one value there is no spread to estimate: ``std`` and ``ci95`` are None.
    """
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None, "values": []}
    mean = math.fsum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None, "values": list(values)}
    from scipy.stats import t

    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "ci95": float(t.ppf(0.975, n - 1)) * std / math.sqrt(n),
        "values": list(values),
    }


def direction(metric: str) -> str:
    """``↑`` (higher is better) or ``↓`` for a result; ``→½`` for the equilibrium diagnostics; else ``""``."""
    for pattern, arrow in RESULT_DIRECTIONS:
        if pattern.match(metric):
            return arrow
    return "→½" if _EQUILIBRIUM.match(metric) else ""


def is_result(metric: str) -> bool:
    """An evaluation metric (a result) rather than a diagnostic: a known result, or any protocol-named metric
    outside a namespace that is not a training scalar or a spread (``is2k_std``)."""
    if any(pattern.match(metric) for pattern, _ in RESULT_DIRECTIONS):
        return True
    return "/" not in metric and not _TRAINING_SCALAR.match(metric) and not metric.endswith("_std")


def _metric_order(names: Iterable[str]) -> list[str]:
    """Results (``fid2k``, ``modes2500``, ...) first, then evaluation diagnostics (``eval/...``), then the training
    scalars; alphabetically within each. Learning rates, timings and counters are dropped."""

    def key(m: str) -> tuple:
        return (0 if is_result(m) else 2 if _TRAINING_SCALAR.match(m) else 1, m.lower())

    return sorted((m for m in set(names) if not _NOT_A_METRIC.match(m)), key=key)


def _header(metric: str) -> str:
    arrow = direction(metric)
    return f"{metric} {arrow}" if arrow else metric


def _fmt(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "—"
    if stat["ci95"] is None:
        return f"{stat['mean']:.4g}"
    return f"{stat['mean']:.4g} ± {stat['ci95']:.2g}"


def _seed_list(runs: Sequence[Run]) -> list[Any]:
    """The distinct seeds of ``runs``: integers in order, anything else after them."""
    return sorted({r.seed for r in runs}, key=lambda s: (0, s, "") if isinstance(s, int) else (1, 0, str(s)))


def paired(arms: Mapping[str, Sequence[Run]], metrics: Sequence[str], baseline: str) -> dict[str, Any] | None:
    """Each arm against the baseline arm of the same variant, seed by seed: per result metric the mean of the
    paired differences (arm − baseline) on the seeds both completed, its 95 % Student-t half-width, and whether
    that interval excludes 0. None when the data set has no baseline arm."""
    ok = {arm: {r.seed: r for r in runs if r.problem is None} for arm, runs in arms.items()}
    bases = {runs[0].variant: arm for arm, runs in arms.items() if runs and runs[0].loss == baseline}
    if not bases:
        return None
    rows = []
    for arm, runs in arms.items():
        base = bases.get(runs[0].variant) if runs else None
        if base is None or base == arm:
            continue
        seeds = [s for s in ok[arm] if s in ok[base]]
        stats: dict[str, Any] = {}
        for m in metrics:
            pairs = [
                (s, ok[arm][s].metrics[m] - ok[base][s].metrics[m])
                for s in seeds
                if m in ok[arm][s].metrics and m in ok[base][s].metrics
            ]
            stat = mean_ci([d for _, d in pairs])
            stat["seeds"] = [s for s, _ in pairs]
            stat["excludes_zero"] = stat["ci95"] is not None and abs(stat["mean"]) > stat["ci95"]
            stats[m] = stat
        rows.append({"arm": arm, "baseline": base, "n": len(seeds), "seeds": seeds, "metrics": stats})
    return {"baseline": baseline, "rows": rows}


def sweep_jobs(root: Path, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The jobs a Hydra sweep launched (its ``multirun.yaml``) that have no completed run: ``pending`` (no run
    folder yet), ``running`` (``summary.json`` says so: still running, or killed) or ``failed``. [] without a
    ``multirun.yaml`` (a W&B sweep, a folder of runs)."""
    path = root / "multirun.yaml"
    if not path.is_file():
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        hydra_cfg = OmegaConf.load(path).hydra
        params = OmegaConf.to_container(hydra_cfg.sweeper.params) if hydra_cfg.sweeper.get("params") else {}
        task = list(hydra_cfg.overrides.task)
        parsed = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()), *task])
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # an unreadable record lists nothing rather than failing the report
        return []
    by_num = {r.job_num: r for r in runs if isinstance(r.job_num, int)}
    # a job's folder (hydra.sweep.subdir starts with its number) that holds no run: it stopped before writing one
    started = {
        int(p.name.split("_", 1)[0]): p for p in root.iterdir() if p.is_dir() and p.name.split("_", 1)[0].isdigit()
    }
    out = []
    for num, overrides in enumerate(jobs):
        run = by_num.get(num)
        if run is not None and run.status == "completed":
            continue
        folder = started.get(num) if run is None else None
        if run is not None:
            state, where, reason = ("running" if run.status == "running" else "failed"), run.path, run.problem
        elif folder is not None:
            state, where = "failed", folder
            reason = (
                "its folder holds no summary.json: the job stopped before training (see the sweep's log or "
                ".submitit/), or is starting now"
            )
        else:
            state, where, reason = "pending", None, None
        out.append(
            {
                "job": num,
                "overrides": " ".join(overrides),
                "state": state,
                "run": None if where is None else _rel(where, root),
                "reason": reason,
            }
        )
    return out


def aggregate(root: Path, runs: Sequence[Run], *, baseline: str = DEFAULT_BASELINE) -> dict[str, Any]:
    """The numbers of the report (what ``report.json`` holds)."""
    grouped = group_runs(runs)
    datasets: dict[str, Any] = {}
    for data, arms in grouped.items():
        ok_metrics = [m for rs in arms.values() for r in rs if r.problem is None for m in r.metrics]
        metrics = _metric_order(ok_metrics)
        rows = []
        for arm, members in arms.items():
            ok = [r for r in members if r.problem is None]
            rows.append(
                {
                    "arm": arm,
                    "loss": members[0].loss,
                    "variant": list(members[0].variant),
                    "n": len(ok),
                    "seeds": _seed_list(ok),
                    "failed": len(members) - len(ok),
                    "runs": [_rel(r.path, root) for r in ok],
                    # each net's parameter counts over the arm's runs (one number when they agree): capacity an
                    # arm adds shows beside its results
                    "params": {n: sorted({r.params[n] for r in ok if n in r.params}) for n in ("g", "d")},
                    "metrics": {m: mean_ci([r.metrics[m] for r in ok if m in r.metrics]) for m in metrics},
                }
            )
        preview = dataset_preview(r for rs in arms.values() for r in rs)
        results = [m for m in metrics if is_result(m)]
        datasets[data] = {
            "preview": preview,
            "metrics": metrics,
            "results": results,
            "diagnostics": [m for m in metrics if not is_result(m)],
            "directions": {m: direction(m) for m in metrics if direction(m)},
            "arms": rows,
            "paired": paired(arms, results, baseline),
        }
    failed = [
        {
            "run": _rel(r.path, root),
            "data": r.data,
            "arm": r.arm,
            "seed": r.seed,
            "status": r.status,
            "problem": r.problem,
            "error": r.error,
        }
        for r in runs
        if r.problem is not None
    ]
    return {
        "folder": str(root),
        "n_runs": len(runs),
        "n_counted": len(runs) - len(failed),
        "datasets": datasets,
        "failed": failed,
        "jobs": sweep_jobs(root, runs),
    }


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------- tables


def markdown_table(dataset: Mapping[str, Any], columns: str = "results") -> str:
    """One Markdown table: a row per arm, ``n``, the seeds, then the ``columns`` (``results``, ``diagnostics`` or
    ``metrics``: both) as mean ± 95 % CI, each header marked with the metric's better direction."""
    metrics = dataset.get(columns, dataset["metrics"])
    show_failed = any(row["failed"] for row in dataset["arms"])
    nets = [
        n for n in ("g", "d") if columns == "results" and any(row.get("params", {}).get(n) for row in dataset["arms"])
    ]
    header = [
        "arm",
        "n",
        "seeds",
        *(["failed"] if show_failed else []),
        *(f"{n.upper()} params" for n in nets),
        *(_header(m) for m in metrics),
    ]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in dataset["arms"]:
        cells = [f"`{row['arm']}`", str(row["n"]), ",".join(str(s) for s in row["seeds"]) or "—"]
        if show_failed:
            cells.append(str(row["failed"]))
        cells += [_span(row["params"][n]) for n in nets]
        cells += [_fmt(row["metrics"][m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(dataset: Mapping[str, Any]) -> str | None:
    """The paired differences to the baseline arm (bold: the 95 % interval excludes 0); None without them."""
    pairs = dataset.get("paired")
    if not pairs or not pairs["rows"] or not dataset["results"]:
        return None
    metrics = dataset["results"]
    header = ["arm − baseline", "n", "seeds", *(_header(m) for m in metrics)]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in pairs["rows"]:
        cells = [f"`{row['arm']}` − `{row['baseline']}`", str(row["n"]), ",".join(map(str, row["seeds"])) or "—"]
        for m in metrics:
            stat = row["metrics"][m]
            text = "—" if stat["mean"] is None else _fmt(stat).replace(f"{stat['mean']:.4g}", f"{stat['mean']:+.4g}", 1)
            cells.append(f"**{text}**" if stat["excludes_zero"] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ----------------------------------------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "metric"


def read_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{metric: {generator step: value}}`` from a run's ``metrics.csv`` (rows are sparse: blanks skipped)."""
    path = run_dir / "metrics.csv"
    curves: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return curves
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # Lightning's CSV ``step`` is the step passed to log_metrics: the generator step in this pipeline
            step_text = row.get("step") or row.get("step/g")
            if not step_text:
                continue
            try:
                step = int(float(step_text))
            except (TypeError, ValueError, OverflowError):
                raise ReportError(f"{path}: line {reader.line_num}: step {step_text!r} is not a number") from None
            for name, text in row.items():
                if name in _CSV_COUNTERS or name is None or text in (None, ""):
                    continue
                try:
                    curves.setdefault(name, {})[step] = float(text)
                except ValueError:
                    continue
    return curves


def _band(series: Sequence[Mapping[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at each step any seed logged (seeds missing a step are left out there)."""
    steps = sorted({s for one in series for s in one})
    mean, lo, hi = [], [], []
    for step in steps:
        vals = [one[step] for one in series if step in one and math.isfinite(one[step])]
        if not vals:
            vals = [math.nan]
        mean.append(math.fsum(vals) / len(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return steps, mean, lo, hi


def plot_curves(data: str, arms: Mapping[str, Sequence[Run]], out_dir: Path) -> dict[str, str]:
    """One PNG per metric (mean line, min–max band over seeds, one colour per arm) and an overview grid.

    Returns ``{metric: file}`` plus ``"_overview"``; runs left out of the table are left out here too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {arm: [read_curves(r.path) for r in runs if r.problem is None] for arm, runs in arms.items()}
    metrics = _metric_order({m for per_arm in curves.values() for one in per_arm for m in one})
    if not metrics:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.get_cmap("tab10")
    files: dict[str, str] = {}

    def draw(ax: Any, metric: str) -> None:
        for i, (arm, per_arm) in enumerate(curves.items()):
            series = [one[metric] for one in per_arm if metric in one]
            if not series:
                continue
            steps, mean, lo, hi = _band(series)
            colour = colours(i % 10)
            # sparse series (evaluations every few thousand steps, or a single final one) need visible points
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, mean, color=colour, lw=1.5, marker=marker, ms=3, label=f"{arm} (n={len(series)})")
            if len(series) > 1:
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)
                if len(steps) == 1:  # a band one step wide is invisible: show the spread as an error bar
                    ax.errorbar(steps, mean, yerr=[[mean[0] - lo[0]], [hi[0] - mean[0]]], color=colour, capsize=4)
        ax.set_xlabel("generator step")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)

    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        draw(ax, metric)
        ax.set_title(f"{data}: {metric} (mean over seeds, band: min–max)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{_safe(metric)}.png"
        fig.savefig(path)
        plt.close(fig)
        files[metric] = path.name

    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.6), dpi=90, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        draw(ax, metric)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 3) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (2.8 * rows + 0.6)))
    path = out_dir / "curves.png"
    fig.savefig(path)
    plt.close(fig)
    files["_overview"] = path.name
    return files


def final_sample(run_dir: Path) -> Path | None:
    """The run's last sample preview (``samples/step_XXXXXXX.png``, zero-padded so names sort by step)."""
    frames = sorted((run_dir / "samples").glob("step_*.png"))
    return frames[-1] if frames else None


def sample_sheet(data: str, arms: Mapping[str, Sequence[Run]], path: Path, *, preview: str = "grid") -> bool:
    """A grid of the final sample previews: one row per arm, one column per seed. False if no run has one.

    ``preview`` is the data set's preview kind (``grid``, ``scatter``, ``density``): plots are resampled smoothly,
    image grids with nearest neighbours, and the title says what the cells show."""
    cells = {(arm, r.seed): final_sample(r.path) for arm, runs in arms.items() for r in runs if r.problem is None}
    if not any(cells.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    arm_names = list(arms)
    seeds = _seed_list([r for runs in arms.values() for r in runs if r.problem is None])
    plot = preview != "grid"
    size = 2.6 if plot else 2.2
    fig, axes = plt.subplots(
        len(arm_names), len(seeds), figsize=(size * len(seeds) + 1.2, size * len(arm_names) + 0.5), squeeze=False
    )
    for i, arm in enumerate(arm_names):
        for j, seed in enumerate(seeds):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = cells.get((arm, seed))
            if img is None:
                ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes, color="0.5")
                for spine in ax.spines.values():
                    spine.set_visible(False)
            else:
                ax.imshow(mpimg.imread(img), interpolation="antialiased" if plot else "nearest")
            if i == 0:
                ax.set_title(f"seed {seed}", fontsize=9)
            if j == 0:
                ax.set_ylabel(arm, fontsize=8)
    fig.suptitle(f"{data}: {PREVIEW_CAPTIONS[preview]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- the report


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: how to read it, a table (and plots) per data set, then every run left out and why."""
    out = [
        f"# Sweep report: `{report['folder']}`",
        "",
        f"{report['n_runs']} run folder(s) found, {report['n_counted']} counted in the tables. Each cell is the mean "
        "over seeds ± the half-width of a 95 % Student-t confidence interval (t(0.975, n−1)·s/√n; no ± when n = 1). "
        "`n` is the number of completed, finite runs in the row; `failed` (when shown) counts the row's runs listed "
        "under *Failed or diverged runs* and left out of the means. Metrics are the final values in each run's "
        "`summary.json` (and its `evals/*.json`): *results* are the evaluation metrics, their header marked ↑ "
        "(higher is better) or ↓; *diagnostics* are D's view of the equilibrium (→½: ideally one half) and the "
        "last logged training scalars (one noisy step: read the curves). Paired differences compare each arm "
        "with the baseline arm seed by seed (mean difference ± 95 % Student-t half-width over the shared seeds); "
        "**bold** marks an interval that excludes 0. Unpaired intervals that overlap mean *not resolved*, not "
        "*equal*.",
        "",
    ]
    if report.get("jobs"):
        counts = {s: sum(j["state"] == s for j in report["jobs"]) for s in ("pending", "running", "failed")}
        said = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        out += [f"Of the sweep's jobs (its `multirun.yaml`), {said}: see *Jobs without a completed run*.", ""]
    for data, ds in report["datasets"].items():
        out += [f"## {data}", "", "Results:", "", markdown_table(ds, "results"), ""]
        pairs = paired_table(ds)
        if pairs:
            out += [f"Paired differences to `{ds['paired']['baseline']}` (same seeds):", "", pairs, ""]
        elif ds["results"] and report.get("baseline"):
            out += [f"No paired differences: no `{report['baseline']}` arm here (choose one with --baseline).", ""]
        if ds["diagnostics"]:
            out += ["Diagnostics:", "", markdown_table(ds, "diagnostics"), ""]
        plots = ds.get("plots") or {}
        if "_overview" in plots:
            links = " · ".join(f"[{m}]({plots[m]})" for m in ds.get("curve_metrics", []) if m in plots)
            out += [
                "Training curves (mean over seeds, band: min–max over seeds):",
                "",
                f"![{data} curves]({plots['_overview']})",
                "",
                f"One plot per metric: {links}",
                "",
            ]
        if ds.get("samples"):
            what = PREVIEW_CAPTIONS[ds["preview"]]
            out += [
                f"{what[0].upper()}{what[1:]} (rows: arms, columns: seeds):",
                "",
                f"![{data} samples]({ds['samples']})",
                "",
            ]
    out += ["## Failed or diverged runs", ""]
    if not report["failed"]:
        out += ["None: every run completed with finite final metrics.", ""]
    else:
        out += ["These runs are not in the means above (their folders keep the logs and the last good checkpoint).", ""]
        out += ["| run | data | arm | seed | status | reason |", "|---|---|---|---|---|---|"]
        for f in report["failed"]:
            reason = _cell(str(f["problem"]).replace("\n", " "))
            out.append(f"| `{f['run']}` | {f['data']} | `{f['arm']}` | {f['seed']} | {f['status']} | {reason} |")
        out.append("")
    if report.get("jobs"):
        out += ["## Jobs without a completed run", ""]
        out += ["| job | state | overrides | run | reason |", "|---|---|---|---|---|"]
        for j in report["jobs"]:
            run = f"`{j['run']}`" if j["run"] else "—"
            reason = _cell(str(j["reason"] or "not started").replace("\n", " "))
            out.append(f"| {j['job']} | {j['state']} | `{_cell(j['overrides'])}` | {run} | {reason} |")
        out.append("")
    return "\n".join(out)


def _jsonable(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON readers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_report(root: Path, *, plots: bool = True, baseline: str = DEFAULT_BASELINE) -> dict[str, Any]:
    """Read the runs below ``root``, write ``report.md``, ``report.json`` and the plots into it; return the report.

    Raises ReportError for a missing folder or one without runs.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"no such folder: {root}")
    for name in ("report.md", "report.json"):  # where the report goes: checked before any work
        if (root / name).exists() and not (root / name).is_file():
            raise ReportError(f"{root / name}: exists and is not a file: move it away")
    if plots and (root / "plots").exists() and not (root / "plots").is_dir():
        raise ReportError(f"{root / 'plots'}: exists and is not a folder: move it away (or --no-plots)")
    runs = find_runs(root)
    if not runs and not (root / "multirun.yaml").is_file():
        raise ReportError(
            f"no run folders (summary.json) under {root}: pass a sweep folder such as outputs/multirun/<date>/<time>"
        )
    report = aggregate(root, runs, baseline=baseline)
    report["baseline"] = baseline
    try:
        if plots:
            grouped = group_runs(runs)
            for data, ds in report["datasets"].items():
                folder = root / "plots" / _safe(data)
                files = plot_curves(data, grouped[data], folder)
                ds["curve_metrics"] = [m for m in files if m != "_overview"]
                ds["plots"] = {m: _rel(folder / f, root) for m, f in files.items()}
                sheet = folder / "samples.png"
                if sample_sheet(data, grouped[data], sheet, preview=ds["preview"]):
                    ds["samples"] = _rel(sheet, root)
        # atomic: a kill or a full disk leaves the earlier report.md/report.json whole, never half of one
        write_text(root / "report.md", render_markdown(report) + "\n")
        write_text(root / "report.json", json.dumps(_jsonable(report), indent=2) + "\n")
    except OSError as exc:
        raise ReportError(f"{exc.filename or root}: cannot write the report ({exc.strerror or exc})") from None
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: print the tables, write the report files; bad input exits 2 with one line."""
    parser = argparse.ArgumentParser(
        prog="report.py", description="Tables (mean ± 95 % CI over seeds) and plots of a sweep's run folders."
    )
    parser.add_argument("folder", type=Path, help="a Hydra multirun folder, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib figures)")
    parser.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        help=f"the arm (loss) every other arm is compared with, seed by seed (default: {DEFAULT_BASELINE})",
    )
    args = parser.parse_args(argv)
    try:
        report = write_report(args.folder, plots=not args.no_plots, baseline=args.baseline)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for data, ds in report["datasets"].items():
        print(f"\n## {data}\n\nResults:\n\n{markdown_table(ds, 'results')}")
        pairs = paired_table(ds)
        if pairs:
            print(f"\nPaired differences to `{ds['paired']['baseline']}` (same seeds; bold: CI excludes 0):\n\n{pairs}")
        if ds["diagnostics"]:
            print(f"\nDiagnostics:\n\n{markdown_table(ds, 'diagnostics')}")
    if report["jobs"]:
        print(f"\n{len(report['jobs'])} job(s) of the sweep without a completed run (multirun.yaml):")
    for j in report["jobs"]:
        print(f"  job {j['job']} {j['state']}: {j['overrides']}" + (f" ({j['reason']})" if j["reason"] else ""))
    if report["failed"]:
        print(f"\n{len(report['failed'])} run(s) failed or diverged (not in the means):")
        for f in report["failed"]:
            print(f"  {f['run']}: {f['problem']}")
    print(f"\nwrote {args.folder / 'report.md'} and {args.folder / 'report.json'}")
    return 0
