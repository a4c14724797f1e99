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


ARM_PARAMETERS = {"gaga": ["--tau", "0.1"], "gaga_mean": ["--tau", "1.5"], "normtest": ["--theta", "1.0"],
                  "ramp": ["--ramp", "0.5"], "noise": ["--c", "0.1"]}
TINY_TRAIN = ["--lr", "0.003", "--budget", "320", "--eval-every", "160", "--quiet"]


def test_every_arm_has_its_parameters_on_the_command_line() -> None:
    from gradaccum.experiments.arms import ARM_TABLE, PARAMETERS

    for arm, spec in ARM_TABLE.items():
        assert set(spec.space) <= set(PARAMETERS), arm
        assert [flag[2:] for flag in ARM_PARAMETERS.get(arm, [])[::2]] == list(spec.space), arm


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["baseline", "gaga", "gaga_mean", "baseline512", "normtest", "fixed64", "fixed128",
                                 "fixed256", "fixed16", "fixed32", "ramp", "noise"])
def test_every_arm_trains_from_the_command_line(arm: str, tmp_path: Path, data_dir: str) -> None:
    """``--arm ramp`` and ``--arm noise`` crashed (no flag for their parameter; ``--c`` was ambiguous)."""
    extra = ARM_PARAMETERS.get(arm, [])
    assert main(["train", "--arm", arm, *TINY_TRAIN, *extra, "--out", str(tmp_path), "--data-dir", data_dir]) == 0
    result = json.loads((tmp_path / f"train-{arm}-seed0.json").read_text())
    assert result["params"] == {"lr": 0.003, **{extra[k][2:]: float(extra[k + 1]) for k in range(0, len(extra), 2)}}
    assert sum(result["batch_sizes"]) + result["flushed_items"] == 320


@pytest.mark.parametrize(("argv", "message"), [
    (["--arm", "baseline", "--tau", "1.5"], "tau: the baseline arm takes no --tau (its parameters: --lr); drop it"),
    (["--arm", "noise", "--c", "0.1", "--theta", "1"],
     "theta: the noise arm takes no --theta (its parameters: --lr, --c)"),
    (["--arm", "ramp", "--ramp", "1.5"], "ramp: the ramp arm needs --ramp, a number in (0, 1], got 1.5"),
    (["--arm", "noise"], "c: the noise arm needs --c, a positive finite number, got None"),
])
def test_a_parameter_an_arm_does_not_take_or_cannot_use_is_refused(argv: list[str], message: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``--tau`` given to the baseline arm was ignored without a word."""
    assert main(["train", *argv, "--lr", "0.01", "--out", str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("train-*.json"))


@pytest.mark.parametrize("argv", [["reproduce", "--conf", "x.yaml"], ["train", "--arm", "baseline", "--lr", "0.1",
                                                                      "--budg", "320"]])
def test_no_flag_is_taken_from_a_prefix_of_its_name(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A prefix used to stand for a flag (``--c`` for ``--config``, or "ambiguous"): each flag is exact."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_train_runs_on_one_thread_shows_progress_and_restores_the_thread_count(
        tmp_path: Path, data_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``train`` ran on every core (7.4 s vs 493 s on a busy machine, and other step counts than
    ``reproduce``'s one-thread workers) and printed nothing while it ran."""
    import torch

    from gradaccum.experiments import runs

    real, seen = runs.train_run, []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "train_run", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["train", "--arm", "baseline", *TINY_TRAIN, "--out", str(tmp_path), "--data-dir", data_dir]
        assert main([a for a in argv if a != "--quiet"]) == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    err = capsys.readouterr().err
    assert "baseline: training samples" in err and "320/320" in err


@pytest.mark.slow
def test_train_on_the_jax_backend_shows_progress(tmp_path: Path, data_dir: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``--backend jax`` printed nothing while it trained (its loop did not report progress)."""
    pytest.importorskip("jax")
    argv = ["train", "--arm", "baseline", "--backend", "jax", *TINY_TRAIN, "--out", str(tmp_path), "--data-dir",
            data_dir]
    assert main([a for a in argv if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "baseline: training samples" in err and "320/320" in err


@pytest.mark.parametrize("command", ["train", "tune"])
def test_ctrl_c_ends_with_one_line_and_code_130(command: str, tmp_path: Path, data_dir: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C printed a KeyboardInterrupt traceback."""
    import optuna

    from gradaccum.experiments import runs, tuning

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs if command == "train" else tuning, "train_run", interrupted)
    argv = [command, "--arm", "baseline", "--out", str(tmp_path), "--data-dir", data_dir, "--quiet", "--budget", "320"]
    try:
        code = main(argv + (["--lr", "0.01"] if command == "train" else []))
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main (a traceback for the user)")
    assert code == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"gradaccum {command}: interrupted" + (
        " (rerun the same command to resume: finished trials are kept)" if command == "tune" else "")]
    if command == "tune":  # the interrupted trial is failed by its owner, not left RUNNING
        study = optuna.load_study(study_name="gradaccum-baseline", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL]


def _still_running(pids: list[int], within: float) -> list[str]:
    """The command lines of ``pids`` still running (not zombies) after up to ``within`` seconds: a
    process that was killed or saw its pipe close may take a moment to be gone on a busy machine."""
    import time

    def running() -> list[str]:
        alive = []
        for pid in pids:
            try:
                if "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                    alive.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
            except (FileNotFoundError, ProcessLookupError):
                pass
        return alive

    deadline = time.time() + within
    while (alive := running()) and time.time() < deadline:
        time.sleep(0.1)
    return alive


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "code_of", "said"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_during_reproduce_ends_fast_and_leaves_no_worker(stop: str, code_of: int, said: str, tmp_path: Path,
                                                                data_dir: str) -> None:
    """Ctrl-C took 16 s and printed tracebacks from every worker; a kill (SIGTERM) leaked the
    pool's semaphores (the resource tracker's warning)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    from gradaccum.experiments.mnist1d_data import load_mnist1d

    load_mnist1d(Path(data_dir) / "mnist1d.npz")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "gradaccum.cli", "reproduce", "--sections", "reference",
                             "--arms", "baseline", "--trials", "4", "--seeds", "1", "--budget", "96000", "--workers",
                             "2", "--out", str(tmp_path), "--data-dir", data_dir, "--quiet"], cwd=root,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        running = []
        while not running and time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                study = optuna.load_study(study_name="gradaccum-baseline",
                                          storage=f"sqlite:///{tmp_path / 'optuna.db'}")
                running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            except Exception:  # noqa: BLE001 - not created yet
                continue
        assert running, "no trial started"
        time.sleep(1.0)  # the workers are computing
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        if stop == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the whole foreground group
        else:
            os.kill(proc.pid, signal.SIGTERM)  # kill sends it to the one process
        start = time.time()
        code = proc.wait(timeout=60)
        took = time.time() - start
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    assert code == code_of and took < 8, (code, took, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"gradaccum reproduce: {said}")
    assert "leaked" not in err and "resource_tracker" not in err, err
    outlived = _still_running(children, within=5.0)
    assert not outlived, f"outlived the interrupted run: {outlived}"
    states = {t.state for t in study.get_trials()}
    assert optuna.trial.TrialState.RUNNING not in states


@pytest.mark.slow
def test_train_gives_what_a_reproduce_worker_gives_for_the_same_seed(tmp_path: Path, data_dir: str) -> None:
    """The determinism the README states: every command trains on one thread per process, so a
    run is the same number for number whichever command (or worker process) ran it."""
    from gradaccum.experiments.config import ExperimentConfig
    from gradaccum.experiments.mnist1d_data import load_mnist1d
    from gradaccum.experiments.runs import train_run
    from gradaccum.experiments.workers import executor

    assert main(["train", "--arm", "gaga_mean", "--tau", "1.5", *TINY_TRAIN, "--seed", "3", "--out", str(tmp_path),
                 "--data-dir", data_dir]) == 0
    here = json.loads((tmp_path / "train-gaga_mean-seed3.json").read_text())
    cfg = ExperimentConfig(out=str(tmp_path), data_dir=data_dir, budget=320, eval_every=160, seed=3)
    data = load_mnist1d(Path(data_dir) / "mnist1d.npz")
    with executor(2) as pool:
        worker = pool.submit(train_run, "gaga_mean", {"lr": 0.003, "tau": 1.5}, 3, data, cfg).result().as_dict()
    for record in (here, worker):
        record.pop("wall_seconds")
        for evaluation in record["evaluations"]:
            evaluation.pop("seconds")
    assert json.loads(json.dumps(worker)) == here


@pytest.mark.slow
def test_critical_batch_quick_writes_its_numbers_and_plot(tmp_path: Path, data_dir: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["critical-batch", "--task", "mnist1d", "--quick", "--workers", "1", "--out", str(tmp_path),
                 "--data-dir", data_dir]) == 0
    results = json.loads((tmp_path / "critical_batch_mnist1d.json").read_text())
    assert [c["step"] for c in results["checkpoints"]] == list(results["plan"]["checkpoints"])
    for c in results["checkpoints"]:
        assert ("b_noise" in c) != ("refused" in c)
        assert set(c["online"]) == {"per_sample", "micro_batch", "adam"}
    rows = (tmp_path / "critical_batch_mnist1d.csv").read_text().splitlines()
    plan = results["plan"]
    assert len(rows) == 1 + len(plan["checkpoints"]) * len(plan["batch_sizes"]) * len(plan["lr_factors"]) * len(
        plan["seeds"])
    assert (tmp_path / "critical_batch_mnist1d.png").read_bytes()[:4] == b"\x89PNG"
    assert "step 25:" in capsys.readouterr().out
