"""`gradaccum reproduce / tune / train / report`: outputs, determinism, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from gradaccum.cli import main
from gradaccum.experiments.reproduce import SECTION_BUDGETS

ROOT = Path(__file__).resolve().parents[1]
# one worker: the runs inline in this process, no pool of processes to start for each call; the
# same settings with a pool of two give the same numbers (test_same_seed_gives_the_same_results)
TINY = ["--quick", "--budget", "1600", "--eval-every", "400", "--quiet", "--sections", "reference", "--workers", "1"]


@pytest.fixture(scope="module", autouse=True)
def torch_threads() -> Iterator[None]:
    """The thread count as it was before this module: one worker computes inline on one thread."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory, data_dir: str) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", *TINY, "--out", str(out), "--data-dir", data_dir, "--arms", "baseline", "gaga"]) == 0
    return out


@pytest.mark.slow
def test_reproduce_writes_every_output(reproduced: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "results.json", "runs.csv", "report.md", "timings.json", "optuna.db",
                 "val_accuracy.png", "effective_batch_and_statistic.png", "optuna_history.png"):
        assert (reproduced / name).stat().st_size > 0, name
        if name != "optuna.db":  # written atomically, yet with the permissions a plain open() gives
            assert stat.S_IMODE((reproduced / name).stat().st_mode) == 0o666 & ~umask, name
    results = json.loads((reproduced / "results.json").read_text())
    assert results["config"]["trials"] == 2 and results["config"]["budget"] == 1600
    for arm in ("baseline", "gaga"):
        entry = results["arms"][arm]
        assert set(entry) == {"best_params", "best_value", "trials", "runs"}
        assert len(entry["trials"]) == 2 and len(entry["runs"]) == 2
        run = entry["runs"][0]
        assert 0 <= run["test_accuracy"] <= 1 and len(run["val_curve"]) == 4
        assert sum(run["batch_sizes"]) + run["flushed_items"] == 1600
    assert "tau" in results["arms"]["gaga"]["best_params"]
    assert set(results["arms"]["baseline"]["runs"][0]["batch_sizes"]) == {32}
    with (reproduced / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"arm", "seed", "test_accuracy", "final_val_accuracy", "optimizer_steps",
                               "mean_batch", "median_batch", "wall_seconds"} <= set(rows[0])
    report = (reproduced / "report.md").read_text()
    for needle in ("95 % CI", "stability", "Reference values", "66.30 %", "## Verdict", "optuna_history.png",
                   "(PyTorch)"):
        assert needle in report


@pytest.mark.slow
def test_same_seed_gives_the_same_results(reproduced: Path, tmp_path: Path, data_dir: str) -> None:
    """Inline (the module's run) or on a pool of two worker processes: the same numbers."""
    assert main(["reproduce", *TINY[:-1], "2", "--out", str(tmp_path), "--data-dir", data_dir,
                 "--arms", "baseline", "gaga"]) == 0
    first = json.loads((reproduced / "results.json").read_text())
    second = json.loads((tmp_path / "results.json").read_text())
    assert (first["config"].pop("workers"), second["config"].pop("workers")) == (1, 2)
    first["config"].pop("out"), second["config"].pop("out")
    assert first == second


def test_report_rebuilt_from_saved_results_equals_the_original(reproduced: Path) -> None:
    original = {name: (reproduced / name).read_bytes() for name in ("report.md", "runs.csv")}
    for name in original:
        (reproduced / name).unlink()
    assert main(["report", "--out", str(reproduced)]) == 0
    for name, content in original.items():
        assert (reproduced / name).read_bytes() == content


@pytest.mark.slow
def test_a_finished_reproduce_is_not_run_again_unless_forced(reproduced: Path, data_dir: str, capsys) -> None:
    """Rerunning a completed reproduce recomputed every final run for minutes."""
    argv = ["reproduce", *TINY, "--out", str(reproduced), "--data-dir", data_dir, "--arms", "baseline", "gaga"]
    before = {p.name: p.stat().st_mtime_ns for p in reproduced.iterdir() if p.is_file()}
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in reproduced.iterdir() if p.is_file()} == before
    results = json.loads((reproduced / "results.json").read_text())
    status = json.loads((reproduced / "sections.json").read_text())
    assert status["reference"]["reused"] is False and status["reference"]["budget_seconds"] > 0
    (reproduced / "report.md").unlink()  # not finished any more: the section is reused, the report rebuilt
    assert main(argv) == 0
    assert json.loads((reproduced / "sections.json").read_text())["reference"]["reused"] is True
    assert json.loads((reproduced / "results.json").read_text()) == results
    assert f"| reference | {SECTION_BUDGETS['reference']} |" in (reproduced / "report.md").read_text()
    assert "reused (finished earlier)" in (reproduced / "report.md").read_text()
    assert main([*argv, "--force"]) == 0  # forced: recomputed, the same numbers
    again = json.loads((reproduced / "results.json").read_text())
    assert json.loads((reproduced / "sections.json").read_text())["reference"]["reused"] is False
    assert again == results


@pytest.mark.slow
def test_finished_final_runs_are_reused_and_say_so(reproduced: Path, tmp_path: Path, data_dir: str) -> None:
    """An interrupted reproduce redid every final run; now the finished ones are read back."""
    out = tmp_path / "again"
    shutil.copytree(reproduced, out)
    (out / "sections.json").unlink()  # as if killed after the final runs, before the section was done
    (out / "results.json").unlink()
    cached = sorted((out / "runs" / "reference").iterdir())
    assert len(cached) == 4  # two arms, two seeds
    cached[0].unlink()  # one run was not finished
    assert main(["reproduce", *TINY, "--out", str(out), "--data-dir", data_dir, "--arms", "baseline", "gaga"]) == 0
    results = json.loads((out / "results.json").read_text())
    reused = [r["reused"] for e in results["arms"].values() for r in e["runs"]]
    assert sorted(reused) == [False, True, True, True]
    first = json.loads((reproduced / "results.json").read_text())
    for entry in (first, results):
        entry["config"].pop("out")
        for e in entry["arms"].values():
            for r in e["runs"]:
                r.pop("reused")
    assert results == first  # read back or trained again, the same records


def test_train_one_run(tmp_path: Path, data_dir: str) -> None:
    assert main(["train", "--arm", "gaga_mean", "--lr", "0.003", "--tau", "1.5", "--budget", "960",
                 "--eval-every", "320", "--out", str(tmp_path), "--data-dir", data_dir, "--quiet"]) == 0
    result = json.loads((tmp_path / "train-gaga_mean-seed0.json").read_text())
    assert result["params"] == {"lr": 0.003, "tau": 1.5} and len(result["val_curve"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("arm", "extra"), [("gaga_mean", ["--tau", "1.5"]), ("baseline512", [])])
def test_train_one_run_on_the_jax_backend(arm: str, extra: list[str], tmp_path: Path, data_dir: str) -> None:
    """``--backend jax``: the Flax MLP through AccumulatingTrainState, same budget and outputs, deterministic."""
    results = []
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(["train", "--arm", arm, "--lr", "0.003", *extra, "--budget", "1000", "--eval-every", "320",
                     "--backend", "jax", "--out", str(out), "--data-dir", data_dir, "--quiet"]) == 0
        results.append(json.loads((out / f"train-{arm}-seed0.json").read_text()))
    first, second = results
    assert len(first["val_curve"]) == 3 and 0.1 < first["test_accuracy"] <= 1
    assert sum(first["batch_sizes"]) + first["flushed_items"] == 1000  # the short last increment included
    assert first["steps"] == len(first["batch_sizes"]) + (first["flushed_items"] > 0)
    if arm == "baseline512":
        # 31 increments of 32 and a last one of 8: the 16th micro-batch closes the second window
        assert first["batch_sizes"] == [512, 488] and first["flushed_items"] == 0
    else:
        assert all(32 <= b <= 512 and b % 32 == 0 for b in first["batch_sizes"])
        assert all(isinstance(v, float) for v in first["statistic"][:len(first["batch_sizes"])])
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second


@pytest.mark.slow
def test_killed_study_resumes_without_repeating_finished_trials(tmp_path: Path, data_dir: str) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [sys.executable, "-m", "gradaccum.cli", "tune", "--arm", "baseline", "--trials", "3", "--budget", "25600",
            "--eval-every", "3200", "--out", str(tmp_path), "--data-dir", data_dir, "--storage", storage, "--quiet"]
    proc = subprocess.Popen(args, cwd=ROOT)
    study = None
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first finished trial (~1.5 s each), then kill mid-study
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="gradaccum-baseline", storage=storage)
            done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
        except Exception:
            continue
        if done:
            break
    proc.kill()
    proc.wait()
    before = {t.number: (t.params, t.value) for t in study.get_trials()
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert 1 <= len(before) < 3
    assert main(args[3:]) == 0  # the same command resumes, here in this process (only the kill needs its own)
    study = optuna.load_study(study_name="gradaccum-baseline", storage=storage)
    after = {t.number: (t.params, t.value) for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(after) == 3
    for number, finished in before.items():
        assert after[number] == finished  # kept, not rerun
    assert len(study.get_trials()) <= 3 + 1  # at most the one killed trial was left unfinished
    # the resumed run continued the sampler's sequence instead of replaying it (a replay ended
    # with twice the trials asked for, their settings repeated)
    assert len({params["lr"] for params, _ in after.values()}) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["reproduce", "--budget", "-5"], "budget must be a positive integer"),
     (["reproduce", "--config", "/nonexistent/settings.yaml"], "config: cannot read"),
     (["reproduce", "--lr-low", "0.1", "--lr-high", "0.01"], "lr_low and lr_high must satisfy"),
     (["train", "--arm", "gaga", "--lr", "0.01"], "tau: the gaga arm needs --tau"),
     (["report", "--out", "/nonexistent/results"], "out: no readable results.json"),
     (["reproduce", "--config", str(ROOT / "tests" / "data" / "backend_pytorch.yaml")], "backend must be one of")],
)
def test_bad_settings_exit_nonzero_with_a_message(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_arm_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "--arms", "adamw"])
    assert info.value.code == 2 and "invalid choice: 'adamw'" in capsys.readouterr().err


@pytest.mark.slow
def test_unwritable_output_and_unopenable_storage(tmp_path: Path, data_dir: str, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["reproduce", *TINY, "--out", str(blocker / "out"), "--data-dir", data_dir]) == 2
    assert "out: cannot write to output directory" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["reproduce", *TINY, "--out", str(out), "--data-dir", data_dir,
                 "--storage", "sqlite:////nonexistent-dir/x/optuna.db"]) == 2
    assert "storage: cannot open Optuna storage" in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "report.md").exists()


def test_config_file_and_flags(tmp_path: Path) -> None:
    from gradaccum.experiments.config import ExperimentConfig

    path = tmp_path / "c.yaml"
    path.write_text("trials: 3\narms: [baseline, normtest]\nbudget: 3200\n")
    cfg = ExperimentConfig.from_yaml(path, budget=6400)
    assert cfg.trials == 3 and cfg.arms == ["baseline", "normtest"] and cfg.budget == 6400
    path.write_text("trails: 3\n")
    with pytest.raises(ValueError, match="unknown settings in .*: trails"):
        ExperimentConfig.from_yaml(path)
    cfg.save(tmp_path / "saved.yaml")
    assert ExperimentConfig.from_yaml(tmp_path / "saved.yaml") == cfg


@pytest.mark.slow
def test_parallel_tune_workers_share_one_study(tmp_path: Path, data_dir: str) -> None:
    storage = f"journal:{tmp_path / 'journal.log'}"
    args = [sys.executable, "-m", "gradaccum.cli", "tune", "--arm", "gaga", "--trials", "4", "--budget", "1600",
            "--eval-every", "800", "--out", str(tmp_path), "--data-dir", data_dir, "--storage", storage, "--quiet"]
    workers = [subprocess.Popen(args, cwd=ROOT) for _ in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    from gradaccum.experiments.tuning import storage as open_storage

    study = optuna.load_study(study_name="gradaccum-gaga", storage=open_storage(storage))
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    # a trial finishing after the other worker reached 4 is pruned as surplus; only two
    # finishing at the same instant can both count, and results use the first 4 by number
    assert 4 <= len(complete) <= 5
    assert len({t.params["lr"] for t in complete}) == len(complete)  # both workers ran every lr twice before
    from gradaccum.experiments.tuning import counted_trials

    assert len(counted_trials(study, 4)) == 4
