"""The report's table of section budgets and times, and its total."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradaccum.experiments.report import sections_table
from gradaccum.experiments.reproduce import SECTION_BUDGETS


def _write(out: Path, reused: dict[str, bool]) -> None:
    status = {name: {"budget_seconds": SECTION_BUDGETS[name], "seconds": 10.0 * (k + 1), "workers": 2,
                     "reused": reused.get(name, False)} for k, name in enumerate(SECTION_BUDGETS)}
    (out / "sections.json").write_text(json.dumps(status))


def test_the_stated_budgets_sum_to_twenty_minutes() -> None:
    assert sum(SECTION_BUDGETS.values()) <= 20 * 60


def test_the_table_adds_every_computed_section_into_a_total(tmp_path: Path) -> None:
    _write(tmp_path, {})
    lines = sections_table(tmp_path)
    total = [line for line in lines if line.startswith("| all |")]
    assert total == [f"| all | {sum(SECTION_BUDGETS.values())} | {10 + 20 + 30 + 40} | | computed |"]


def test_no_total_is_claimed_when_a_section_was_reused(tmp_path: Path) -> None:
    _write(tmp_path, {"front": True})
    lines = sections_table(tmp_path)
    assert not [line for line in lines if line.startswith("| all |")]
    assert any(line.startswith("| front |") and "reused" in line for line in lines)


def test_a_later_call_of_one_section_neither_claims_nor_totals_the_others(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A full call, then a call of the LM section alone with other settings: the table says the
    other sections were finished earlier and gives no total."""
    import contextlib

    import gradaccum.experiments.reproduce as rp
    from gradaccum.experiments.config import ExperimentConfig

    monkeypatch.setattr(rp, "prepare_output", lambda cfg: (Path(cfg.out), None))
    monkeypatch.setattr(rp, "_run_section", lambda *a, **k: None)
    monkeypatch.setattr(rp, "write_full_report", lambda out: None)
    monkeypatch.setattr(rp, "executor", lambda n: contextlib.nullcontext(None))
    rp.reproduce(ExperimentConfig(out=str(tmp_path)))
    assert any(line.startswith("| all |") for line in sections_table(tmp_path))
    rp.reproduce(ExperimentConfig(out=str(tmp_path), sections=["lm"], lm_seeds=2))
    lines = sections_table(tmp_path)
    assert not any(line.startswith("| all |") for line in lines)
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert rows["lm"].endswith("| computed |")
    assert all("reused" in rows[name] for name in ("reference", "front", "critical"))
