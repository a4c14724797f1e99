"""The steps-quality front: its arithmetic on known numbers, the LM corpus, and both
sections end to end on tiny budgets (deterministic with parallel workers)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gradaccum.cli import main
from gradaccum.experiments.config import ExperimentConfig
from gradaccum.experiments.errors import SettingsError
from gradaccum.experiments.front import pareto, points_at, run_front, spread
from gradaccum.experiments.front_report import (
    choices,
    first_reaching,
    noise_scale_quarters,
    overall,
    paired_ratio,
    targets,
    verdict,
)
from gradaccum.experiments.lm_regime import POINTS
from gradaccum.experiments.lm_task import TEST_FILES, TRAIN_FILES, VALIDATION_FILES, ByteGPT, load_corpus, sequences
from gradaccum.experiments.mnist1d_data import load_mnist1d
from gradaccum.experiments.reproduce import LM_INCREMENT, mnist1d_front
from gradaccum.experiments.workers import executor


def evaluations(*points: tuple[int, float]) -> list[dict]:
    return [{"samples": 100 * (k + 1), "steps": s, "val": m} for k, (s, m) in enumerate(points)]


def test_a_level_is_reached_by_a_moving_average_not_by_one_lucky_evaluation() -> None:
    """The first crossing of a noisy curve used to credit a level its curve touched once."""
    lucky = evaluations((10, 0.3), (20, 0.7), (30, 0.4), (40, 0.5), (50, 0.6), (60, 0.65), (70, 0.62))
    assert first_reaching(lucky, 0.6, True) == 4  # (0.6 + 0.65 + 0.62) / 3; the 0.7 at 20 steps is one lucky one
    assert first_reaching(lucky, 0.7, True) is None
    assert first_reaching(lucky, 0.5, True) == 1  # (0.7 + 0.4 + 0.5) / 3 = 0.533
    tail = evaluations((10, 0.3), (20, 0.3), (30, 0.8))
    assert first_reaching(tail, 0.5, True) is None  # a last evaluation has no full window after it
    losses = evaluations((10, 3.0), (20, 2.0), (30, 2.2), (40, 2.1))
    assert first_reaching(losses, 2.2, False) == 1  # lower is better
    unstepped = evaluations((0, 0.9), (0, 0.9), (1, 0.9), (2, 0.9), (3, 0.9))
    assert first_reaching(unstepped, 0.5, True) == 2  # never before the first optimizer step


def test_paired_ratios_against_a_hand_computation() -> None:
    adaptive, fixed = [50.0, 80.0, 60.0], [100.0, 100.0, 120.0]
    logs = [math.log(0.5), math.log(0.8), math.log(0.5)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    p = 0.975  # the t quantile at 2 degrees of freedom has a closed form
    half = (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))) * sd / math.sqrt(3)
    ratio = paired_ratio(adaptive, fixed)
    assert ratio == pytest.approx((math.exp(mean), math.exp(mean - half), math.exp(mean + half)), rel=1e-12)
    assert verdict(ratio) == "no difference"  # 0.58x, yet the interval [0.30-1.12] contains 1
    assert verdict(paired_ratio([50.0, 52.0, 49.0], [100.0, 101.0, 99.0])) == "fewer steps"
    assert verdict(paired_ratio([150.0, 160.0, 149.0], [100.0, 101.0, 99.0])) == "more steps"
    assert verdict(paired_ratio([50.0], [100.0])) == "no interval (one seed)"
    assert verdict(None) == "not reached"
    with pytest.raises(ValueError, match="as many"):
        paired_ratio([1.0, 2.0], [1.0])


def _run(seed: int, vals: list[float], steps_per_eval: int, test: float = 0.5) -> dict:
    return {"seed": seed, "test_accuracy": test, "final_val_accuracy": vals[-1], "steps": steps_per_eval * len(vals),
            "evaluations": [{"samples": 320 * (k + 1), "steps": steps_per_eval * (k + 1), "val": v}
                            for k, v in enumerate(vals)]}


def _front(arms: dict) -> dict:
    return {"task": "mnist1d", "title": "t", "metric": "accuracy", "start": 0.1, "about": {},
            "config": {"budget": 3200, "increment": 32, "max_samples": 512, "eval_every": 320, "front_trials": 2,
                       "seeds": 3, "lr_low": 1e-4, "lr_high": 3e-2},
            "arms": arms}


def test_targets_come_from_the_validation_split_of_the_best_fixed_arm() -> None:
    def arm(finals, adaptive=False):
        return {"adaptive": adaptive, "points": [{"runs": [_run(s, [0.1, f, f, f], 10, test=0.0)
                                                           for s, f in enumerate(finals)]}]}

    front = _front({"a": arm([0.60, 0.62, 0.64]), "b": arm([0.710, 0.711, 0.712]),
                    "c": arm([0.9, 0.9, 0.9], adaptive=True)})
    best, levels = targets(front)
    assert best == "b"  # the adaptive arm never sets the targets; the test accuracies (0) are never read
    assert levels == pytest.approx([0.711 - 0.005, 0.711 - 0.01, 0.711 - 0.02])  # the margins exceed 5.5 SE
    noisy = _front({"b": arm([0.60, 0.70, 0.80])})
    _, levels = targets(noisy)
    se = 0.1 / math.sqrt(3)
    assert levels == pytest.approx([0.7 - 2.5 * se, 0.7 - 4 * se, 0.7 - 5.5 * se])


def test_one_rule_for_fixed_and_adaptive_arms_that_miss_a_level() -> None:
    """A fixed arm that missed in a seed was dropped while an adaptive arm that missed lost:
    now a point missing a level in any seed does not reach it, whichever kind it is."""
    up = [0.2, 0.4, 0.6, 0.7, 0.7, 0.7, 0.7]
    flat = [0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5]
    arms = {"slow": {"adaptive": False, "points": [{"runs": [_run(s, up, 100) for s in range(3)]}]},
            # fast in two seeds, misses in one: it cannot be the fixed front at 0.65
            "quick": {"adaptive": False, "points": [{"runs": [_run(0, up, 10), _run(1, up, 10), _run(2, flat, 10)]}]},
            "adapt": {"adaptive": True, "points": [{"runs": [_run(0, up, 10), _run(1, up, 10), _run(2, flat, 10)]},
                                                   {"runs": [_run(s, up, 50) for s in range(3)]}]}}
    result = choices(_front(arms), {})
    row = next(r for r in result["rows"] if abs(r["level"] - 0.68) < 1e-9)  # the best fixed arm, 0.7, less 0.02
    assert row["reference"] == "slow"
    assert row["arms"]["adapt"]["point"] == 1  # its first point missed in seed 2, as "quick" did
    assert row["ratios"]["adapt"]["steps"][0] == pytest.approx(0.5)
    assert verdict(row["ratios"]["adapt"]["steps"]) == "fewer steps"  # 50 / 100 steps on every seed


def test_the_noise_scale_is_the_ratio_of_averaged_terms() -> None:
    """The report's B_simple was the median of per-window ratios: biased low for noisy windows."""
    windows = [[32, 1000.0, 1.0], [32, 10.0, 9.0], [32, 10.0, 9.0]]  # [samples, tr(Sigma), |G|^2]
    runs = [{"noise_terms": windows * 4}]  # 12 windows of 32 samples: 3 per quarter of 384
    front = {"config": {"budget": 384}, "arms": {"noise": {"points": [{"runs": runs}]}}}
    quarters = noise_scale_quarters(front)
    assert quarters == pytest.approx([1020.0 / 19.0] * 4)  # not the median ratio 10 / 9
    runs[0]["noise_terms"] = [None] * 12
    assert noise_scale_quarters(front) is None


def test_pareto_points_and_the_nearest_lower_choice() -> None:
    trials = [SimpleNamespace(number=k, values=v) for k, v in
              enumerate([(0.60, 100), (0.65, 300), (0.62, 300), (0.70, 900), (0.50, 50), (0.69, 1000)])]
    front = pareto(trials, higher_is_better=True)
    assert [t.number for t in front] == [4, 0, 1, 3]
    assert [t.number for t in points_at(front, [3000, 1500, 750, 375, 188, 40])] == [0, 1, 3]
    assert [t.number for t in points_at(front, [1000, 60])] == [4, 3]
    assert [t.number for t in spread(front, 3)] == [4, 1, 3] and spread(front, 1) == [front[-1]]
    assert spread(front, 9) == front
    losses = pareto([SimpleNamespace(number=0, values=(2.0, 10)), SimpleNamespace(number=1, values=(1.5, 20))], False)
    assert [t.number for t in losses] == [0, 1]


def test_overall_says_no_difference_only_where_every_level_says_so() -> None:
    same = {"reference": "f", "ratios": {"a": {"steps": (0.9, 0.7, 1.2)}}}
    assert overall([same, same], "a").startswith("no difference")
    fewer = {"reference": "f", "ratios": {"a": {"steps": (0.5, 0.4, 0.6)}}}
    assert overall([same, fewer], "a") == "is mixed across the levels (1 fewer steps, 1 no difference)"


def test_the_corpus_is_the_fixed_standard_library_files() -> None:
    corpus = load_corpus()
    assert corpus.about["train"]["files"] == list(TRAIN_FILES)
    assert not set(TRAIN_FILES) & set(VALIDATION_FILES) | set(TRAIN_FILES) & set(TEST_FILES)
    assert corpus.about["train"]["bytes"] > 1_000_000 and corpus.about["test"]["bytes"] > 50_000
    assert len(corpus.about["val"]["sha256"]) == 64
    batch = sequences(corpus.train, 32)
    assert batch.shape[1] == 33 and bool((batch[1:, 0] == batch[:-1, -1]).all())  # targets: the next bytes
    model = ByteGPT(32, 64, 2)
    assert model.head.weight is model.wte.weight


def test_a_missing_corpus_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="argparse.py"):
        load_corpus(str(tmp_path))


LM_BUDGET = 64  # sequences per LM run: fewer steps of the smallest batch than the stated run's POINTS
TINY_FRONT = ["--quick", "--budget", "640", "--eval-every", "160", "--lm-budget", str(LM_BUDGET), "--front-trials", "2",
              "--seeds", "2", "--quiet", "--sections", "front", "lm", "--workers", "2"]


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory, data_dir: str) -> Path:
    out = tmp_path_factory.mktemp("front")
    assert main(["reproduce", *TINY_FRONT, "--out", str(out), "--data-dir", data_dir]) == 0
    return out


@pytest.mark.slow
def test_both_front_sections_write_results_plots_and_verdicts(fronts: Path) -> None:
    report = (fronts / "report.md").read_text()
    assert report.index("mnist1d") < report.index("byte-level language model")
    for needle in ("## Verdicts", "## The whole front", "Ratios are paired per seed", "mnist1d_front.png",
                   "lm_front.png",
                   "Corpus: Python", "SHA-256", "## The noise-scale regime and the two statistics sources",
                   "passes 8x the smallest batch in", "Tolerance on extra samples", "lm_sources.png"):
        assert needle in report
    with (fronts / "lm_sources.csv").open() as f:  # the stated LM run, both sources at every point
        rows = list(csv.DictReader(f))
    regime = json.loads((fronts / "lm_regime.json").read_text())
    steps = LM_BUDGET // LM_INCREMENT  # the stated run: the smallest batch, a point at every step up to POINTS
    assert regime["batch"] == LM_INCREMENT and regime["steps"] == steps
    assert len(rows) == len(regime["points"]) == min(steps, POINTS)
    assert all(float(r["per_sample_b_simple"]) > 0 and float(r["micro_batch_b_simple"]) > 0 for r in rows)
    assert (fronts / "lm_sources.png").stat().st_size > 0
    for task, arms in (("mnist1d", 9), ("lm", 10)):
        front = json.loads((fronts / f"{task}_results.json").read_text())
        assert len(front["arms"]) == arms and (fronts / f"{task}_front.png").stat().st_size > 0
        for arm, entry in front["arms"].items():
            assert entry["points"], arm
            for point in entry["points"]:
                assert len(point["runs"]) == 2
                for run in point["runs"]:
                    steps = [e["steps"] for e in run["evaluations"]]
                    assert steps == sorted(steps) and len(steps) >= 4 and "seconds" not in run["evaluations"][0]
        timings = json.loads((fronts / f"{task}_timings.json").read_text())
        for arm, points in timings.items():  # the times, kept apart, one per evaluation
            assert [[len(t["evaluation_seconds"]) for t in p] for p in points] == \
                [[len(r["evaluations"]) for r in point["runs"]] for point in front["arms"][arm]["points"]]


@pytest.mark.slow
def test_the_front_is_the_same_for_the_same_seed_with_parallel_workers(fronts: Path, tmp_path: Path,
                                                                        data_dir: str) -> None:
    args = [a for a in TINY_FRONT if a != "lm"]
    assert main(["reproduce", *args, "--out", str(tmp_path), "--data-dir", data_dir]) == 0
    first = json.loads((fronts / "mnist1d_results.json").read_text())
    second = json.loads((tmp_path / "mnist1d_results.json").read_text())
    first["config"].pop("out"), second["config"].pop("out")
    first["config"].pop("sections"), second["config"].pop("sections")
    assert first == second


def test_the_front_sections_refuse_the_jax_backend(tmp_path: Path, capsys) -> None:
    assert main(["reproduce", "--sections", "front", "--backend", "jax", "--out", str(tmp_path), "--quiet"]) == 2
    assert "front, lm and critical sections run on torch" in capsys.readouterr().err


def test_a_front_without_fixed_points_is_refused_with_its_cause(tmp_path: Path, capsys) -> None:
    """A front report with no points raised "max() of an empty sequence"."""
    front = {"task": "mnist1d", "title": "t", "metric": "accuracy", "start": 0.1, "about": {},
             "config": {"budget": 320, "increment": 32, "eval_every": 160, "front_trials": 2, "seeds": 1},
             "arms": {"baseline": {"adaptive": False, "trials": [], "points": []},
                      "noise": {"adaptive": True, "trials": [], "points": []}}}
    with pytest.raises(SettingsError, match="mnist1d_results.json: no fixed-batch arm has a retrained point"):
        targets(front)
    (tmp_path / "mnist1d_results.json").write_text(json.dumps(front))
    (tmp_path / "mnist1d_timings.json").write_text("{}")
    assert main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no fixed-batch arm has a retrained point" in err and "--sections front" in err


def _choices_of(front: dict) -> dict:
    """Every choice of a front: the tuning trials, the retrained points' settings, and per level
    the fixed front's arm, each arm's point and the per-seed steps."""
    picked = choices(front, {})
    return {"trials": {arm: e["trials"] for arm, e in front["arms"].items()},
            "points": {arm: [p["params"] for p in e["points"]] for arm, e in front["arms"].items()},
            "best_fixed": picked["best_fixed"],
            "rows": [(r["level"], r["reference"], {a: v and (v["point"], v["seeds"]) for a, v in r["arms"].items()})
                     for r in picked["rows"]]}


@pytest.mark.slow
def test_no_choice_reads_the_test_split(fronts: Path, tmp_path: Path, data_dir: str) -> None:
    """Random test labels change the test column and nothing else: the settings, the points, the
    targets, the fixed front at each level. (Targets and the best fixed arm came from test.) The
    clean front is the module's; the poisoned one is run with its settings on a pool of as many
    workers, the same seed."""
    clean = json.loads((fronts / "mnist1d_results.json").read_text())
    cfg = ExperimentConfig(**{**clean["config"], "out": str(tmp_path)})
    assert cfg.processes == 2 and cfg.seeds == 2 and cfg.front_trials == 2
    data = load_mnist1d(Path(data_dir) / "mnist1d.npz")
    rng = np.random.default_rng(0)
    poisoned = data._replace(y_test=rng.integers(0, 10, size=len(data.y_test)).astype(data.y_test.dtype))
    with executor(cfg.processes) as pool:
        bad = json.loads(json.dumps(run_front(mnist1d_front(poisoned), cfg, pool, tmp_path)))
    assert _choices_of(clean) == _choices_of(bad)
    assert any(any(arms.values()) for _, _, arms in _choices_of(clean)["rows"])  # levels reached: rows to compare
    tests = [[r["test_accuracy"] for e in f["arms"].values() for p in e["points"] for r in p["runs"]]
             for f in (clean, bad)]
    assert tests[0] != tests[1]  # the test split was read, once per run, and only there


def test_the_final_runs_are_submitted_costly_arms_first_in_a_stable_order() -> None:
    from gradaccum.experiments.front import costly_first

    jobs = [("baseline", 0, {}, 1), ("noise", 0, {}, 1), ("fixed64", 0, {}, 1), ("normtest", 1, {}, 1),
            ("noise", 0, {}, 2), ("baseline", 0, {}, 2)]
    order = costly_first(jobs)
    assert order == [1, 3, 4, 0, 2, 5]
    assert sorted(order) == list(range(len(jobs)))  # every job once: the records are put back by it
