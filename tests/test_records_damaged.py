"""Damaged or blocked files are one line (``error: <file>: <reason>``, exit code 2), never a stack trace, and
cost nothing already written: a cut summary.json on resume or in eval, an ``evals`` that is a file (refused before
the metrics are computed), a ``report.md`` that is a folder, a metrics.csv row whose step is not a number."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY, compose_cfg
from ganlab.errors import UserError
from ganlab.pipeline import train

RING = [*TINY, "model.lr_decay=none", "max_steps=3"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("damaged") / "sweep" / "run"
    train(compose_cfg(RING), run)  # ring8 evaluates at its last step (modes2500)
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "sweep" / "run"
    shutil.copytree(finished, copy)
    return copy


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err
    return err


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def test_a_cut_summary_on_resume_is_one_line_and_changes_nothing(run: Path) -> None:
    _cut(run / "summary.json")
    before = _files(run)
    with pytest.raises(UserError, match=r"summary\.json: not readable JSON") as info:
        train(compose_cfg([*RING, "max_steps=5", "resume=auto"]), run)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    assert _files(run) == before


def test_a_metrics_csv_row_with_a_bad_step_is_one_line_on_resume_and_in_the_report(run: Path, capsys) -> None:
    from ganlab.report import main as report_main

    csv = run / "metrics.csv"
    lines = csv.read_text().splitlines()
    lines[2] = "abc" + lines[2][lines[2].index(",") :]
    csv.write_text("\n".join(lines) + "\n")
    before = _files(run)
    with pytest.raises(UserError, match=r"metrics\.csv: line 3: step 'abc' is not a number"):
        train(compose_cfg([*RING, "max_steps=5", "resume=auto"]), run)
    assert _files(run) == before  # refused before the first write: the record stays as it was
    assert report_main([str(run.parent)]) == 2
    _one_line(capsys, "metrics.csv: line 3", "'abc'")


def test_eval_with_a_cut_summary_or_a_blocked_evals_is_one_line_before_any_work(
    run: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ganlab import pipeline
    from ganlab.evaluate import main as eval_main

    def no_work(*args, **kwargs):
        raise AssertionError("the metrics were computed before the output was checked")

    monkeypatch.setattr(pipeline, "metrics_callback", no_work)
    (run / "evals").write_text("a file where the evaluations go")
    before = _files(run)
    assert eval_main([str(run), "--no-wandb"]) == 2
    _one_line(capsys, "evals", "not a folder")
    assert _files(run) == before
    (run / "evals").unlink()
    (run / "evals").mkdir()
    (run / "evals" / "index.json").write_text('{"evals": [')
    assert eval_main([str(run), "--no-wandb"]) == 2
    _one_line(capsys, "index.json", "not readable JSON")
    shutil.rmtree(run / "evals")
    _cut(run / "summary.json")
    before = _files(run)
    assert eval_main([str(run), "--no-wandb"]) == 2
    _one_line(capsys, "summary.json", "not readable JSON")
    assert _files(run) == before


def test_a_report_md_that_is_a_folder_is_one_line_before_any_work(run: Path, capsys) -> None:
    from ganlab.report import main as report_main

    sweep = run.parent
    (sweep / "report.md").mkdir()
    (sweep / "report.md" / "keep.txt").write_text("mine")
    assert report_main([str(sweep)]) == 2
    _one_line(capsys, "report.md", "not a file")
    assert (sweep / "report.md" / "keep.txt").read_text() == "mine"
    assert not (sweep / "report.json").exists() and not (sweep / "plots").exists()  # nothing was written
