"""The experiment's Optuna storage under faults: torn journal lines, a full disk, trials whose
owner is alive or gone, workers outliving their parent, and studies whose every trial diverges."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from gradaccum.experiments import study_storage, tuning, workers
from gradaccum.experiments.config import ExperimentConfig
from gradaccum.experiments.errors import SettingsError
from gradaccum.experiments.mnist1d_data import MNIST1D, load_mnist1d
from gradaccum.experiments.run_record import RunResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(data_dir: str) -> MNIST1D:
    return load_mnist1d(Path(data_dir) / "mnist1d.npz")  # the session's cache (tests/conftest.py)


def fake_result(arm: str, params: dict, seed: int, *_: object, diverged: bool = False) -> RunResult:
    """A finished run without training: the value grows with the lr, so trials differ."""
    return RunResult(arm=arm, params=dict(params), seed=seed, test_accuracy=0.5, final_val_accuracy=params["lr"],
                     val_curve=[[160, 0.5]], steps=5, batch_sizes=[32] * 5, flushed_items=0, statistic=[None] * 5,
                     wall_seconds=0.0, diverged=diverged)


def diverging(arm: str, params: dict, seed: int, *rest: object) -> RunResult:
    return fake_result(arm, params, seed, diverged=True)


def counted_diverging(calls: list[int]):
    """A run that always diverges, counting its calls; past 100 tuning has not stopped (a hang)."""
    def run(*args: object) -> RunResult:
        calls.append(1)
        if len(calls) > 100:
            raise AssertionError("tuning did not stop")
        return diverging(*args)

    return run


def journal_cfg(tmp_path: Path, trials: int) -> ExperimentConfig:
    return ExperimentConfig(out=str(tmp_path), trials=trials, budget=320, eval_every=160, arms=["baseline"],
                            storage=f"journal:{tmp_path / 'journal.log'}")


def complete_trials(cfg: ExperimentConfig) -> dict[int, float]:
    study = optuna.load_study(study_name="gradaccum-baseline", storage=tuning.storage(cfg.storage_url))
    return {t.number: t.value for t in study.get_trials() if t.state == TrialState.COMPLETE}


@pytest.mark.slow
def test_a_torn_last_journal_line_is_cut_and_the_study_goes_on(data: MNIST1D, tmp_path: Path, monkeypatch) -> None:
    """A writer killed mid-line left half a record; the next tune glued a record to it and every
    trial of the study was lost (the journal no longer parsed)."""
    monkeypatch.setattr(tuning, "train_run", fake_result)
    cfg = journal_cfg(tmp_path, trials=2)
    tuning.tune_arm("baseline", cfg, data)
    before = complete_trials(cfg)
    assert len(before) == 2
    path = tmp_path / "journal.log"
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"op_code":5,"worker_id":"dead-writer","trial_id":0,"user_at')  # killed mid-line
    with pytest.warns(RuntimeWarning, match=r"journal.log ended in a torn record \(\d+ bytes without a newline"):
        tuning.tune_arm("baseline", journal_cfg(tmp_path, trials=4), data)
    after = complete_trials(cfg)
    assert len(after) == 4 and all(after[n] == v for n, v in before.items())
    assert path.read_bytes().startswith(whole)  # every whole record kept, the torn one gone
    assert all(json.loads(line) for line in path.read_bytes().splitlines())


def test_a_full_disk_mid_append_leaves_the_journal_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC after part of a line: the append fails with the disk's error, the part written is
    cut, and the next append (space freed) works; the journal stays readable throughout."""
    path = tmp_path / "journal.log"
    storage = tuning.storage(f"journal:{path}")
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study_storage.ask(study)
    size = path.stat().st_size
    real = os.write

    def full(fd: int, data: bytes) -> int:
        real(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(study_storage.os, "write", full)
    with pytest.raises(OSError, match="No space left on device"):
        trial.set_user_attr("note", "x" * 100)
    monkeypatch.undo()
    assert path.stat().st_size == size
    study.tell(trial, 1.0)
    reloaded = optuna.load_study(study_name="s", storage=tuning.storage(f"journal:{path}"))
    assert [t.state for t in reloaded.get_trials()] == [TrialState.COMPLETE]
    assert "note" not in reloaded.get_trials()[0].user_attrs


@pytest.mark.slow
def test_a_real_short_write_does_not_destroy_the_journal(tmp_path: Path) -> None:
    """The kernel writes part of the line, then refuses the rest (a file-size limit stands in
    for a full disk: the same short write, then an error); the study stays readable."""
    script = textwrap.dedent(f"""
        import optuna, resource, signal, sys
        from gradaccum.experiments.tuning import storage
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        url = "journal:{tmp_path / 'journal.log'}"
        study = optuna.create_study(study_name="s", storage=storage(url))
        trial = study.ask()  # a warning (heartbeats outside optimize), ignored with -W
        size = {str(tmp_path / 'journal.log')!r}
        import os
        limit = os.path.getsize(size) + 40
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            trial.set_user_attr("note", "x" * 200)
            sys.exit("the write did not fail")
        except OSError:
            pass
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        study.tell(trial, 1.0)
        again = optuna.load_study(study_name="s", storage=storage(url))
        print([t.state.name for t in again.get_trials()])
    """)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['COMPLETE']"


def _full_disk_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLAlchemy commit fails as SQLite does on a full disk."""
    import sqlalchemy.exc
    import sqlalchemy.orm

    def commit(self: object) -> None:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as error:
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, error) from error

    monkeypatch.setattr(sqlalchemy.orm.Session, "commit", commit)


def _age_heartbeats(db: Path, seconds: int) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?)", (f"-{seconds} seconds",))


def test_a_full_disk_under_sqlite_names_the_cause_and_its_trial_is_failed_once_stale(
        data: MNIST1D, tmp_path: Path, monkeypatch) -> None:
    """The message said "invalid data in the commit" for a full disk, and every rerun left one
    more RUNNING trial behind."""
    cfg = ExperimentConfig(out=str(tmp_path), trials=2, budget=320, eval_every=160, arms=["baseline"])

    def run_then_fill_the_disk(*args: object) -> RunResult:
        _full_disk_commits(monkeypatch)
        return fake_result(*args)

    monkeypatch.setattr(tuning, "train_run", run_then_fill_the_disk)
    with pytest.raises(SettingsError) as info:
        tuning.tune_arm("baseline", cfg, data)
    assert "database or disk is full" in str(info.value) and "the disk is full: free space" in str(info.value)
    monkeypatch.undo()
    monkeypatch.setattr(tuning, "train_run", fake_result)
    study = optuna.load_study(study_name="gradaccum-baseline", storage=tuning.storage(cfg.storage_url))
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]  # its owner could not write either
    _age_heartbeats(tmp_path / "optuna.db", study_storage.GRACE_SECONDS + 5)  # the owner is gone
    tuning.tune_arm("baseline", cfg, data)
    states = [t.state for t in study.get_trials()]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 2
    assert TrialState.RUNNING not in states


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_only_a_trial_whose_owner_is_gone_is_failed(kind: str, tmp_path: Path, monkeypatch) -> None:
    """``reproduce`` failed every RUNNING trial of the study, a live ``tune`` worker's included
    (which then crashed); now only one without a heartbeat for the grace period."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'journal.log'}"
    owner = optuna.create_study(study_name="s", storage=tuning.storage(url))
    live, dead = study_storage.ask(owner), study_storage.ask(owner)
    with study_storage.Heartbeats() as beats:
        beats.add(owner, live)
        beats.add(owner, dead)
        beats.remove(dead)  # its owner stopped beating; time passes
        if kind == "sqlite":
            with sqlite3.connect(tmp_path / "optuna.db") as connection:
                connection.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') "
                                   "WHERE trial_id = ?", (dead._trial_id,))
        else:
            monkeypatch.setattr(study_storage.time, "time", lambda real=time.time: real() + 3600)
            beats._beat(live._trial_id, owner._storage)  # the live owner beats on
            monkeypatch.undo()
            monkeypatch.setattr(study_storage.time, "time", lambda real=time.time: real() + 3600 + 1)
        other = optuna.load_study(study_name="s", storage=tuning.storage(url))  # reproduce, starting
        assert workers.fail_stale(other) == [dead.number]
        states = {t.number: t.state for t in other.get_trials()}
        assert states == {live.number: TrialState.RUNNING, dead.number: TrialState.FAIL}
        assert tuning.finish(owner, live, {"mean_batch": 32.0}, value=0.5)  # the live owner goes on
    with pytest.warns(RuntimeWarning, match="failed by another process"):
        assert not tuning.finish(owner, dead, {}, value=0.5)  # a stalled owner's result is dropped, no crash


@pytest.mark.slow
def test_reproduce_leaves_a_live_tune_workers_trial_alone(tmp_path: Path, data: MNIST1D, data_dir: str) -> None:
    """End to end: a ``gradaccum tune`` process mid-trial, another process failing stale trials
    of the same study (as ``reproduce`` does when it starts); the tune finishes normally."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [sys.executable, "-m", "gradaccum.cli", "tune", "--arm", "baseline", "--trials", "1", "--budget", "48000",
            "--eval-every", "16000", "--out", str(tmp_path), "--data-dir", data_dir, "--storage",
            storage, "--quiet"]  # a trial of ~3 s: seen running, held there, then left to finish
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        running = []
        while time.time() < deadline and not running and proc.poll() is None:
            time.sleep(0.05)
            try:
                study = optuna.load_study(study_name="gradaccum-baseline", storage=tuning.storage(storage))
            except Exception:  # noqa: BLE001 - not created yet
                continue
            running = study.get_trials(states=(TrialState.RUNNING,))
        proc.send_signal(signal.SIGSTOP)  # held mid-trial (alive, not computing) while it is judged
        assert running, f"the tune process never started a trial (exit code {proc.poll()})"
        try:
            assert workers.fail_stale(study) == []
            assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]  # judged while its owner was mid-trial
        finally:
            proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE]


@pytest.mark.slow
def test_pool_workers_die_with_their_parent(tmp_path: Path) -> None:
    """SIGKILL of ``reproduce`` left its workers computing as orphans."""
    script = textwrap.dedent("""
        import sys, time
        from gradaccum.experiments.workers import executor
        pool = executor(2)
        futures = [pool.submit(time.sleep, 120) for _ in range(2)]
        time.sleep(1.0)
        print(" ".join(str(pid) for pid in pool._processes), flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 60  # a worker still importing torch ends when it reaches its initializer
        alive = pids
        while alive and time.time() < deadline:
            time.sleep(0.1)
            alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_study_whose_every_trial_diverges_stops_and_says_the_lr_range_is_wrong(
        data: MNIST1D, tmp_path: Path, monkeypatch) -> None:
    """Every trial diverging pruned forever (552 trials in 300 s)."""
    calls: list[int] = []
    monkeypatch.setattr(tuning, "train_run", counted_diverging(calls))
    cfg = ExperimentConfig(out=str(tmp_path), trials=3, budget=320, eval_every=160, arms=["baseline"])
    with pytest.raises(SettingsError, match=r"baseline: the last 10 trials all diverged .* the lr range "
                                            r"\[0.0001, 0.03\] is wrong for this arm; lower --lr-high"):
        tuning.tune_arm("baseline", cfg, data)
    assert len(calls) == tuning.diverged_limit(1) == 10


@pytest.mark.slow
@pytest.mark.parametrize("section", ["reference", "front"])
def test_rounds_whose_every_trial_diverges_stop(section: str, data: MNIST1D, tmp_path: Path) -> None:
    from gradaccum.experiments.front import FrontTask
    from gradaccum.experiments.front import tuning as front_tuning
    from gradaccum.experiments.reproduce import tuning_of

    cfg = ExperimentConfig(out=str(tmp_path), trials=3, budget=320, eval_every=160, arms=["baseline"],
                           front_trials=4)
    if section == "reference":
        plan = tuning_of("baseline", cfg, data)
    else:
        plan = front_tuning(FrontTask("mnist1d", "t", diverging, data, "accuracy", 0.1, ("normtest",)), "normtest", cfg)
    calls: list[int] = []
    with pytest.raises(SettingsError, match=r"the last 10 trials all diverged"):
        workers.tune_in_rounds(workers.InlineExecutor(), counted_diverging(calls), [plan], batch=1)
    assert len(calls) == 10
    states = {t.state for t in plan.study.get_trials()}
    assert states == {TrialState.PRUNED}  # every trial told: none left RUNNING
