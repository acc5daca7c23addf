"""``generate.py out=<folder>`` never overwrites what is there: a non-empty folder or a file is refused in one line
(exit code 2) before the model is loaded, and a folder that cannot be written is one line too."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, compose_cfg
from ganlab.generate import main as generate_main
from ganlab.pipeline import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gen") / "run"
    train(compose_cfg([*TINY, "metrics=none", "max_steps=2"]), folder)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_non_empty_out_folder_is_refused_and_kept(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert generate_main([str(run), "n=8", f"out={out}"]) == 0
    before = _files(out)
    capsys.readouterr()
    assert generate_main([str(run), "n=4", "seed=1", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not empty" in err, err
    assert _files(out) == before  # the first samples, as they were
    assert generate_main([str(run), "n=4", f"out={tmp_path / 'empty'}"]) == 0  # a new folder is fine
    (tmp_path / "bare").mkdir()
    assert generate_main([str(run), "n=4", f"out={tmp_path / 'bare'}"]) == 0  # and so is an empty one


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_an_out_that_is_or_lies_under_a_file_is_one_line(run: Path, tmp_path: Path, capsys, kind: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    out = blocker if kind == "file" else blocker / "sub"
    assert generate_main([str(run), "n=4", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert blocker.read_text() == "keep me"
