"""The LM's noise-scale regime: per-quarter B_simple by both sources, the report's lines, the CSV."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from gradaccum.experiments.config import ExperimentConfig
from gradaccum.experiments.errors import SettingsError
from gradaccum.experiments.lm_regime import (
    CSV_COLUMNS,
    SOURCES,
    measure_regime,
    plot_sources,
    quarters,
    regime_lines,
    regime_section,
    sources_csv,
    steps_saved,
)


def point(sequences: int, per_sample: tuple[float, float], micro_batch: tuple[float, float]) -> dict:
    terms = {"per_sample": per_sample, "micro_batch": micro_batch}
    return {"step": sequences // 4, "sequences": sequences, "val_loss": 3.0,
            **{s: {"trace": t, "squared_norm": g, "b_simple": t / g, "windows": 4} for s, (t, g) in terms.items()}}


def series() -> dict:
    """Two points per quarter of a 64-sequence budget; in quarter 1 the per-sample source's mean of
    the per-point ratios (10 and 100: 55) differs from the ratio of its averaged terms (310 / 4)."""
    points = [point(8, (10.0, 1.0), (20.0, 1.0)), point(16, (300.0, 3.0), (40.0, 2.0)),    # quarter 1
              point(24, (50.0, 1.0), (30.0, 1.0)), point(32, (70.0, 1.0), (30.0, 1.0)),    # quarter 2
              point(40, (36.0, 1.0), (60.0, 2.0)), point(48, (36.0, 1.0), (60.0, 2.0)),    # quarter 3
              point(56, (120.0, 2.0), (90.0, 3.0)), point(64, (80.0, 2.0), (90.0, 3.0))]  # quarter 4
    return {"arm": "baseline", "lr": 1e-3, "seed": 0, "batch": 4, "budget": 64, "steps": 16, "windows": 4,
            "per_window": 4, "points": points, "seconds": 0.0}


def reference_quarters(points: list[dict], budget: int, source: str) -> list[float]:
    """Slow and plain: a point belongs to the quarter whose half-open interval (lo, hi] holds it."""
    out = []
    for k in range(4):
        lo, hi = k * budget / 4, (k + 1) * budget / 4
        inside = [p for p in points if lo < p["sequences"] <= hi]
        out.append(math.fsum(p[source]["trace"] for p in inside) / math.fsum(p[source]["squared_norm"] for p in inside))
    return out


@pytest.mark.parametrize("source", SOURCES)
def test_quarters_are_the_ratio_of_the_averaged_terms(source: str) -> None:
    regime = series()
    got = quarters(regime["points"], regime["budget"], source)
    assert got == pytest.approx(reference_quarters(regime["points"], 64, source), rel=1e-12)
    if source == "per_sample":
        assert got[0] == pytest.approx(310 / 4)  # not the mean of the per-point ratios, 55
        assert got == pytest.approx([77.5, 60.0, 36.0, 50.0])


def test_a_quarter_without_a_point_is_refused_and_the_report_says_so() -> None:
    regime = series()
    regime["points"] = [p for p in regime["points"] if not 32 < p["sequences"] <= 48]
    with pytest.raises(ValueError, match=r"points: quarter\(s\) \[3\]"):
        quarters(regime["points"], 64, "per_sample")
    text = "\n".join(regime_lines(regime))
    assert "No per-quarter noise scale" in text and "passes" not in text


def test_the_regime_line_counts_the_quarters_at_or_above_8x_the_smallest_batch() -> None:
    text = "\n".join(regime_lines(series()))
    # per-sample quarters 77.5, 60, 36, 50 over batch 4: 19.4x, 15.0x, 9.0x, 12.5x
    assert "| per-sample source | 19.4x | 15.0x | 9.0x | 12.5x |" in text
    assert "| micro-batch source | 5.0x | 7.5x | 7.5x | 7.5x |" in text
    assert "passes 8x the smallest batch in 4 of 4 quarters" in text
    regime = series()
    regime["points"][5]["per_sample"].update(trace=20.0)  # quarter 3: (36 + 20) / 2 = 28 = 7x
    assert "in 3 of 4 quarters" in "\n".join(regime_lines(regime))
    regime["points"][4]["per_sample"].update(trace=28.0)  # exactly 8 x 4 = 32 passes: (28 + 36) / 2
    regime["points"][5]["per_sample"].update(trace=36.0)
    assert "in 4 of 4 quarters" in "\n".join(regime_lines(regime))


@pytest.mark.parametrize(("ratio", "extra"), [(8.0, 1.0), (12.5, 0.25), (3.0, 0.1)])
def test_steps_saved_follows_mccandlish_model(ratio: float, extra: float) -> None:
    c, saved = steps_saved(ratio, extra)
    b_min, b_noise = 4.0, ratio * 4.0

    def steps(b: float) -> float:  # S = S_min (1 + B_noise / B), S_min = 1
        return 1 + b_noise / b

    assert c * b_min * steps(c * b_min) / (b_min * steps(b_min)) == pytest.approx(1 + extra)  # E(cB) = (1+x) E(B)
    rho = steps(c * b_min) / steps(b_min)
    assert saved == pytest.approx(1 - rho)
    assert ratio == pytest.approx((1 + extra) * (1 - rho) / (rho * extra))


def test_the_sources_csv_has_one_row_per_point_with_both_sources() -> None:
    regime = series()
    rows = list(csv.DictReader(io.StringIO(sources_csv(regime))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {"per_sample_b_simple", "micro_batch_b_simple"} <= set(CSV_COLUMNS)
    assert len(rows) == len(regime["points"])
    for row, p in zip(rows, regime["points"]):
        assert int(row["sequences"]) == p["sequences"]
        for source in SOURCES:
            assert float(row[f"{source}_b_simple"]) == pytest.approx(p[source]["trace"] / p[source]["squared_norm"])
            assert float(row[f"{source}_trace"]) == pytest.approx(p[source]["trace"])


def test_the_plot_and_the_section_from_a_saved_file(tmp_path: Path) -> None:
    plot_sources(series(), tmp_path / "lm_sources.png")
    assert (tmp_path / "lm_sources.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert regime_section(tmp_path, "lm") == []  # no stated run: nothing to say
    (tmp_path / "lm_regime.json").write_text(json.dumps(series()))
    assert "passes 8x" in "\n".join(regime_section(tmp_path, "lm"))
    (tmp_path / "lm_regime.json").write_text("{")
    with pytest.raises(SettingsError, match="lm_regime.json"):
        regime_section(tmp_path, "lm")


def test_a_short_stated_run_measures_both_sources_at_every_point() -> None:
    cfg = ExperimentConfig(budget=48, increment=4, max_samples=16, quiet=True)
    regime = measure_regime(1e-3, 0, cfg)
    assert [p["step"] for p in regime["points"]] == list(range(1, 13))  # 12 steps, fewer than POINTS
    for p in regime["points"]:
        for source in SOURCES:
            assert p[source]["windows"] == 4 and p[source]["b_simple"] > 0 and math.isfinite(p[source]["b_simple"])
    assert len(quarters(regime["points"], 48, "micro_batch")) == 4


def test_an_lm_section_of_another_model_or_without_its_stated_run_is_not_reused(tmp_path: Path) -> None:
    from gradaccum.experiments.lm_task import shape
    from gradaccum.experiments.reproduce import _settings, finished

    cfg = ExperimentConfig(out=str(tmp_path), quiet=True)
    settings = _settings(cfg, "lm")
    assert settings["lm_model"] == shape(cfg)
    (tmp_path / "lm_results.json").write_text("{}")

    def status(settings: dict) -> None:
        (tmp_path / "sections.json").write_text(json.dumps({"lm": {"settings": settings, "reused": False}}))

    status(settings)
    assert not finished(cfg, tmp_path, "lm")  # no lm_regime.json: the stated run is missing
    (tmp_path / "lm_regime.json").write_text("{}")
    assert finished(cfg, tmp_path, "lm")
    status({**settings, "lm_model": {**shape(cfg), "context": 32}})  # finished with another model
    assert not finished(cfg, tmp_path, "lm")
    status({k: v for k, v in settings.items() if k != "lm_model"})  # or by a version that did not record it
    assert not finished(cfg, tmp_path, "lm")


def test_the_lm_studies_and_run_keys_name_the_model() -> None:
    from gradaccum.experiments.reproduce import lm_front
    from gradaccum.experiments.workers import run_key

    task, lm_cfg = lm_front(ExperimentConfig(quiet=True))
    assert task.key == "lm-context12-dim64-layers2"
    job = ("baseline", {"lr": 1e-3}, 0, None, lm_cfg)
    assert run_key(task.key, job) != run_key("lm", job)
