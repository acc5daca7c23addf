"""``report.md`` and ``report.json`` are replaced atomically: a write that fails (a full disk) leaves the earlier
report whole, no temporary file, and one line with exit code 2."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from ganlab.report import main


def _sweep(root: Path) -> None:
    for seed in (0, 1):
        run = root / f"{seed}"
        run.mkdir(parents=True)
        summary = {"status": "completed", "seed": seed, "choices": {"data": "ring8", "loss": "minimax"},
                   "overrides": [f"seed={seed}"], "final": {"modes2500": 8.0 - seed}}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))


def test_a_failed_report_write_leaves_the_earlier_report_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _sweep(tmp_path)
    assert main([str(tmp_path), "--no-plots"]) == 0
    before = {n: (tmp_path / n).read_bytes() for n in ("report.md", "report.json")}
    (tmp_path / "2").mkdir()  # a third run: the next report differs
    (tmp_path / "2" / "summary.json").write_text(
        (tmp_path / "1" / "summary.json").read_text().replace('"seed": 1', '"seed": 2')
    )
    real = Path.write_text

    def full_disk(self: Path, text: str, *args, **kwargs) -> int:
        real(self, text[: len(text) // 2], *args, **kwargs)  # what a disk that fills up mid-write leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    capsys.readouterr()
    assert main([str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "No space left" in err, err
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not list(tmp_path.glob("*.tmp"))
