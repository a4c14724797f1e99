"""The steps-quality front: its arithmetic on known numbers, the LM corpus, and both
sections end to end on tiny budgets (deterministic with parallel workers)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from gradaccum.cli import main
from gradaccum.experiments.errors import SettingsError
from gradaccum.experiments.front import pareto, points_at
from gradaccum.experiments.front_report import compare, overall, targets, to_target
from gradaccum.experiments.lm_task import TEST_FILES, TRAIN_FILES, VALIDATION_FILES, ByteGPT, load_corpus, sequences


def evaluations(*points: tuple[int, float]) -> list[dict]:
    return [{"samples": 100 * (k + 1), "steps": s, "test": m} for k, (s, m) in enumerate(points)]


def test_steps_to_target_interpolate_between_evaluations() -> None:
    runs = evaluations((10, 0.3), (20, 0.5), (30, 0.7))
    assert to_target(runs, [1.0, 2.0, 3.0], 0.6, True, 0.1) == pytest.approx((25.0, 2.5, 250.0))
    assert to_target(runs, None, 0.2, True, 0.1)[0] == pytest.approx(5.0)  # from the untrained metric at step 0
    assert to_target(runs, None, 0.8, True, 0.1) is None
    assert math.isnan(to_target(runs, None, 0.6, True, 0.1)[1])
    losses = evaluations((10, 3.0), (20, 2.0))
    assert to_target(losses, None, 2.5, False, 5.5)[0] == pytest.approx(15.0)  # lower is better


def test_targets_sit_more_than_two_standard_errors_below_the_best_fixed_arm() -> None:
    def arm(tests, adaptive=False):
        return {"adaptive": adaptive, "points": [{"runs": [{"test_accuracy": t} for t in tests]}]}

    front = {"metric": "accuracy", "arms": {"a": arm([0.60, 0.62, 0.64]), "b": arm([0.710, 0.711, 0.712]),
                                            "c": arm([0.9, 0.9, 0.9], adaptive=True)}}
    best, levels = targets(front)
    assert best == "b"  # the adaptive arm never sets the targets
    assert levels == pytest.approx([0.711 - 0.005, 0.711 - 0.01, 0.711 - 0.02])  # the margins exceed 5.5 SE
    noisy = {"metric": "accuracy", "arms": {"b": arm([0.60, 0.70, 0.80])}}
    _, levels = targets(noisy)
    se = 0.1 / math.sqrt(3)
    assert levels == pytest.approx([0.7 - 2.5 * se, 0.7 - 4 * se, 0.7 - 5.5 * se])


def test_pareto_points_and_the_nearest_lower_choice() -> None:
    trials = [SimpleNamespace(number=k, values=v) for k, v in
              enumerate([(0.60, 100), (0.65, 300), (0.62, 300), (0.70, 900), (0.50, 50), (0.69, 1000)])]
    front = pareto(trials, higher_is_better=True)
    assert [t.number for t in front] == [4, 0, 1, 3]
    assert [t.number for t in points_at(front, [3000, 1500, 750, 375, 188, 40])] == [0, 1, 3]
    assert [t.number for t in points_at(front, [1000, 60])] == [4, 3]
    losses = pareto([SimpleNamespace(number=0, values=(2.0, 10)), SimpleNamespace(number=1, values=(1.5, 20))], False)
    assert [t.number for t in losses] == [0, 1]


def test_verdicts_compare_intervals() -> None:
    fixed = {"steps": (100.0, 90.0, 110.0)}
    assert compare({"steps": (50.0, 40.0, 60.0)}, fixed) == "fewer steps"
    assert compare({"steps": (150.0, 140.0, 160.0)}, fixed) == "more steps"
    assert compare({"steps": (105.0, 95.0, 115.0)}, fixed) == "equal within intervals"
    assert compare({"reached": 2, "seeds": 5}, fixed) == "more steps (not reached)"
    rows = [{"fastest_fixed": "f", "verdicts": {"a": "equal within intervals"}}] * 2
    assert overall(rows, "a").startswith("no difference")


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


TINY_FRONT = ["--quick", "--budget", "640", "--eval-every", "160", "--lm-budget", "96", "--front-trials", "2",
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
    for needle in ("## Verdicts", "Targets: the best fixed arm", "mnist1d_front.png", "lm_front.png",
                   "Corpus: Python", "SHA-256"):
        assert needle in report
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
    assert "front and lm sections run on torch" in capsys.readouterr().err


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
