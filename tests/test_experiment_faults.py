"""The experiment and CLI under faults and bad input.

No hang, no raw traceback for bad input, no silent use of a corrupted file, no temporary
left behind; a diverging run is recorded as such and tuning goes on.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from gradaccum.cli import main
from gradaccum.experiments import tuning
from gradaccum.experiments.config import ExperimentConfig
from gradaccum.experiments.errors import SettingsError
from gradaccum.experiments.files import write_atomic
from gradaccum.experiments.mnist1d_data import MNIST1D, load_mnist1d
from gradaccum.experiments.run_record import RunResult
from gradaccum.experiments.runs import train_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--budget", "640", "--eval-every", "320", "--quiet", "--sections", "reference"]


@pytest.fixture(scope="module")
def data_dir(data_dir: str) -> Path:
    """The session's mnist1d cache (tests/conftest.py), generated here if no test has yet."""
    path = Path(data_dir)
    load_mnist1d(path / "mnist1d.npz")
    return path


@pytest.fixture(scope="module")
def data(data_dir: Path) -> MNIST1D:
    return load_mnist1d(data_dir / "mnist1d.npz")


@pytest.mark.slow
def test_an_increment_no_epoch_can_hold_is_refused_not_a_hang(data_dir: Path, tmp_path: Path, capsys) -> None:
    """It passed validation, then spun at 100 % CPU: no increment fits in 3,200 samples."""
    assert main(["train", "--arm", "baseline", "--lr", "0.01", "--increment", "4000", "--max-samples", "8000",
                 "--budget", "8000", "--out", str(tmp_path), "--data-dir", str(data_dir), "--quiet"]) == 2
    assert "increment (4000) is larger than the training split (3200 samples)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_diverging_run_is_reported_as_diverged(backend: str, data: MNIST1D, tmp_path: Path) -> None:
    """JAX exited 0 with "mean effective batch 2"; torch raised out of the trial."""
    poisoned = data._replace(x_train=np.full_like(data.x_train, np.nan))
    cfg = ExperimentConfig(out=str(tmp_path), budget=320, eval_every=160, backend=backend)
    result = train_run("baseline", {"lr": 0.01}, 0, poisoned, cfg)
    assert result.diverged and result.steps == 0


def test_a_diverging_trial_is_pruned_and_the_study_goes_on(data: MNIST1D, tmp_path: Path, monkeypatch) -> None:
    real = tuning.train_run
    calls = []

    def flaky(arm, params, seed, data, cfg):
        calls.append(params["lr"])
        result = real(arm, params, seed, data, cfg)
        return RunResult(**{**result.as_dict(), "diverged": len(calls) == 1})

    monkeypatch.setattr(tuning, "train_run", flaky)
    cfg = ExperimentConfig(out=str(tmp_path), trials=2, budget=320, eval_every=160, arms=["baseline"])
    study = tuning.tune_arm("baseline", cfg, data)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.COMPLETE]
    assert study.get_trials()[0].user_attrs["pruned"] == "diverged"
    assert len(set(calls)) == 3  # the rerun samples another lr, not the one that diverged


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "zero_labels", "too_small"])
def test_a_damaged_data_cache_is_regenerated(damage: str, data: MNIST1D, data_dir: Path, tmp_path: Path) -> None:
    """A truncated cache gave BadZipFile on every rerun, random bytes a misleading "allow_pickle"
    message, all-zero labels trained silently, a small file hung the run."""
    cache = tmp_path / "mnist1d.npz"
    if damage == "truncated":  # the first 1000 bytes of a good cache
        cache.write_bytes((data_dir / "mnist1d.npz").read_bytes()[:1000])
    elif damage == "random_bytes":
        cache.write_bytes(os.urandom(4096))
    else:
        bad = data._replace(y_train=np.zeros_like(data.y_train)) if damage == "zero_labels" else \
            data._replace(x_train=data.x_train[:10], y_train=data.y_train[:10])
        np.savez(cache, **bad._asdict())
    got = load_mnist1d(cache)
    assert all(np.array_equal(a, b) for a, b in zip(got, data))
    assert all(np.array_equal(a, b) for a, b in zip(load_mnist1d(cache), data))  # rewritten whole


@pytest.mark.parametrize(("content", "message"), [
    ("null", "expected an object with 'config'"),
    ("{}", "expected an object with 'config'"),
    ('{"config": {"budget": 1, "eval_every": 1, "trials": 1, "seeds": 1}, "arms": {"baseline": {}}}',
     "arm 'baseline' must hold best_params"),
    ("NAN", "NaN"),
    ("ACC", "arms.baseline.runs[0].test_accuracy must be an accuracy between 0 and 1, got 7.5"),
    ("CURVE", "arms.baseline.runs[0].val_curve must hold [samples, accuracy] pairs, accuracies between 0 and 1"),
    ("STEPS", "arms.baseline.runs[0].steps must be >= 0, got -3"),
])
def test_report_on_a_bad_results_file_names_the_problem(content: str, message: str, tmp_path: Path, capsys) -> None:
    if content in ("NAN", "ACC", "CURVE", "STEPS"):  # a 750 % accuracy was reported as is
        run = {"seed": 0, "test_accuracy": 0.5, "final_val_accuracy": 0.5, "val_curve": [[160, 0.5]], "steps": 10,
               "batch_sizes": [32] * 10, "flushed_items": 0, "statistic": [], "warnings": []}
        run.update({"NAN": {"test_accuracy": math.nan}, "ACC": {"test_accuracy": 7.5},
                    "CURVE": {"val_curve": [[160, 1.5]]}, "STEPS": {"steps": -3}}[content])
        good = {"config": {"budget": 320, "eval_every": 160, "trials": 1, "seeds": 1},
                "arms": {"baseline": {"best_params": {"lr": 0.01}, "trials": [], "runs": [run]}}}
        content = json.dumps(good)
    (tmp_path / "results.json").write_text(content)
    assert main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and (message in err or "test_accuracy must be a finite float" in err)


@pytest.mark.parametrize(("content", "message"), [(b"", "is an empty file"),
                                                   (b"SQLite format 3\x00" + os.urandom(3000), "not a usable SQLite")])
def test_an_empty_or_malformed_study_database_is_refused(content: bytes, message: str, tmp_path: Path,
                                                          data_dir: Path, capsys) -> None:
    """A 0-byte file silently started a new study; a malformed one was used until it failed."""
    (tmp_path / "optuna.db").write_bytes(content)
    assert main(["tune", "--arm", "baseline", *TINY, "--out", str(tmp_path), "--data-dir", str(data_dir)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_a_full_disk_leaves_no_temporary_and_names_the_path(where: str, tmp_path: Path, monkeypatch) -> None:
    """A failure at close or rename left ``*.tmp`` files behind (keeping a full disk full)."""
    target = tmp_path / "results.json"
    target.write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, where, full)
    with pytest.raises(SettingsError, match=r"cannot write .*results.json: .*No space left on device"):
        write_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.slow
def test_a_full_disk_during_reproduce_exits_2_without_temporaries(tmp_path: Path, data_dir: Path, monkeypatch,
                                                                  capsys) -> None:
    real = os.replace

    def full_for_reports(src, dst, *args, **kwargs):
        if str(dst).endswith("report.md"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_for_reports)
    import torch

    threads = torch.get_num_threads()
    # one worker: the run inline in this process (on one thread), no pool of processes to start
    assert main(["reproduce", *TINY, "--trials", "1", "--seeds", "1", "--arms", "baseline", "--workers", "1",
                 "--out", str(tmp_path), "--data-dir", str(data_dir)]) == 2
    assert torch.get_num_threads() == threads  # the inline worker's one thread was this process's for the run only
    assert "report.md: [Errno 28] No space left on device" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("argv", "message"), [
    (["reproduce", "--seed", "-1"], "seed must be a non-negative integer"),
    (["plan", "--max-memory", "inf"], "max_memory must be a positive finite number"),
    (["plan", "--max-memory", "100", "--start", "100", "--max-size", "10"], "start (100) must be <="),
    (["train", "--arm", "gaga", "--lr", "0.01", "--tau", "nan"], "tau: the gaga arm needs --tau"),
    (["train", "--arm", "baseline", "--lr", "-1"], "lr must be a positive finite number"),
])
def test_bad_values_are_refused_by_name(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("seed: 1.5\n", "seed must be int, got 1.5"),
    ("out: 123\n", "out must be str, got 123"),
    ("arms: baseline\n", "arms must be a list of arm names"),
    ("quiet: 1\n", "quiet must be bool"),
])
def test_yaml_values_of_the_wrong_type_are_refused(yaml_text: str, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert main(["reproduce", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_a_duplicate_yaml_key_is_refused_naming_it_and_its_lines(tmp_path: Path) -> None:
    """``lr`` given twice kept the last value without a word."""
    path = tmp_path / "c.yaml"
    path.write_text("trials: 3\nbudget: 3200\ntrials: 5\n")
    with pytest.raises(SettingsError) as info:  # what `--config` reads
        ExperimentConfig.from_yaml(path)
    assert "config: cannot read" in str(info.value) and "found the duplicate key 'trials' (first at line 1)" in str(
        info.value) and "line 3" in str(info.value)


def test_every_yaml_the_library_reads_refuses_duplicate_keys() -> None:
    from gradaccum import AccumulationConfig
    from gradaccum._yaml import safe_load

    with pytest.raises(ValueError, match="duplicate key 'batch_size'"):
        AccumulationConfig.from_yaml("batch_size: 8\ngradient_accumulation_steps: 4\nbatch_size: 16\n")
    with pytest.raises(Exception, match="duplicate key 'k'"):
        safe_load("outer:\n  - {k: 1, k: 2}\n")
    # a key merged in with << may be overridden: YAML's merge key means exactly that
    assert safe_load("base: &b {x: 1, y: 2}\nmine:\n  <<: *b\n  x: 3\n")["mine"] == {"x": 3, "y": 2}


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path: Path) -> None:
    """The catch-all ``except ValueError`` swallowed real bugs as "bad input". (An output
    directory of its own: a finished reproduce in the working directory has nothing to do.)"""
    from gradaccum.experiments import reproduce

    def bug(cfg, **options):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(reproduce, "reproduce", bug)
    with pytest.raises(ValueError, match="a bug, not bad input"):
        main(["reproduce", "--quiet", "--out", str(tmp_path / "reproduce")])


@pytest.mark.slow
def test_two_workers_on_a_fresh_sqlite_file_both_start(tmp_path: Path, data_dir: Path) -> None:
    """One died with "UNIQUE constraint failed: alembic_version" (1 in 3)."""
    storage = f"sqlite:///{tmp_path / 'fresh.db'}"
    args = [sys.executable, "-m", "gradaccum.cli", "tune", "--arm", "baseline", "--trials", "2", *TINY[1:],
            "--out", str(tmp_path), "--data-dir", str(data_dir), "--storage", storage]
    workers = [subprocess.Popen(args, cwd=ROOT) for _ in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]


@pytest.mark.slow
def test_the_experiments_extra_is_named_when_missing(tmp_path: Path) -> None:
    """A library user needs torch or jax and numpy, not Optuna: the CLI names the extra."""
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] == 'optuna':\n"
            "        raise ModuleNotFoundError(\"No module named 'optuna'\", name='optuna')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from gradaccum.cli import main\n"
            "sys.exit(main(['tune', '--arm', 'baseline', '--out', sys.argv[1]]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "needs the experiments extra (optuna is missing)" in done.stderr
    assert "'.[experiments]'" in done.stderr


@pytest.mark.slow
def test_import_gradaccum_needs_no_experiment_stack() -> None:
    code = ("import sys, gradaccum, gradaccum.torch\n"
            "bad = [m for m in ('optuna', 'matplotlib', 'scipy', 'mnist1d') if m in sys.modules]\n"
            "sys.exit(1 if bad else 0)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0





@pytest.mark.slow
def test_a_file_in_the_way_of_the_data_dir_is_named(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    assert main(["train", "--arm", "baseline", "--lr", "0.01", *TINY[1:], "--out", str(tmp_path / "out"),
                 "--data-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "data_dir: cannot create" in err and "sub" in err


def test_the_report_counts_diverged_final_runs(tmp_path: Path, capsys) -> None:
    run = {"seed": 0, "test_accuracy": 0.1, "final_val_accuracy": 0.1, "val_curve": [[160, 0.1]], "steps": 0,
           "batch_sizes": [], "flushed_items": 0, "statistic": [], "warnings": [], "diverged": True}
    good = dict(run, test_accuracy=0.6, final_val_accuracy=0.6, steps=10, batch_sizes=[32] * 10, diverged=False)
    results = {"config": {"budget": 320, "eval_every": 160, "trials": 1, "seeds": 2},
               "arms": {"baseline": {"best_params": {"lr": 0.01}, "trials": [], "runs": [good, run]}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert "1 of 2 final runs diverged" in (tmp_path / "report.md").read_text()


def test_a_storage_failure_mid_tune_names_the_storage(data: MNIST1D, tmp_path: Path, monkeypatch) -> None:
    """A full disk under SQLite mid-tune ended in "AssertionError: Should not reach."; the
    storage's own error now reaches the user as a SettingsError naming the storage."""
    real_tell = optuna.Study.tell

    def full(self, *args, **kwargs):
        raise optuna.exceptions.StorageInternalError("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(optuna.Study, "tell", full)
    cfg = ExperimentConfig(out=str(tmp_path), trials=2, budget=320, eval_every=160, arms=["baseline"])
    with pytest.raises(SettingsError, match=r"storage: writing to 'sqlite:///.*optuna.db' failed: .*disk is full"):
        tuning.tune_arm("baseline", cfg, data)
    monkeypatch.setattr(optuna.Study, "tell", real_tell)
    assert len(tuning.tune_arm("baseline", cfg, data).get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2


@pytest.mark.slow
def test_every_pool_worker_ignores_ctrl_c_from_its_start() -> None:
    """A Ctrl-C reaching a worker still importing torch printed its traceback: every worker is
    started with the pool, with SIGINT already ignored (inherited across its exec)."""
    from gradaccum.experiments.workers import executor

    pool = executor(2)
    try:
        processes = list(pool._processes.values())  # type: ignore[attr-defined]
        assert len(processes) == 2
        for process in processes:
            status = Path(f"/proc/{process.pid}/status").read_text()
            ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
            assert ignored & (1 << (2 - 1)), "SIGINT is not ignored"
    finally:
        pool.shutdown()


def test_one_inline_worker_computes_on_one_thread_and_gives_the_threads_back() -> None:
    """``workers=1`` runs the jobs in this process on one thread, as a worker process would, and
    the process has its thread count back when the pool's ``with`` block ends."""
    import torch

    from gradaccum.experiments.workers import executor

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with executor(1) as pool:
            assert pool.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
