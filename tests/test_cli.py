"""The `gradaccum` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradaccum.cli import main


def test_demo_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--quiet"]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["max_abs_error_vs_full_batch_float64"] < 1e-12
    assert result["effective_batch"] == 64 and result["optimizer_steps"] == 32
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert "max abs difference" in capsys.readouterr().out


def test_demo_is_deterministic(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        main(["demo", "--out", str(tmp_path / name), "--epochs", "1", "--quiet"])
        result = json.loads((tmp_path / name / "demo.json").read_text())
        result.pop("train_seconds")
        runs.append(result)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("bad", [["demo", "--epochs", "0"], ["demo", "--epochs", "x"], ["nope"], []])
def test_bad_arguments_exit_nonzero(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(bad)
    assert info.value.code != 0
    assert "error" in capsys.readouterr().err
