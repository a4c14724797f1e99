"""Tuning on a real PostgreSQL server: two workers share one study, and a killed study resumes.

The fixture starts a private server (Debian's ``postgresql`` package) on a Unix socket in a
temporary directory, with no TCP listener. CI installs the package and sets
``GRADACCUM_REQUIRE_POSTGRES=1``, which turns a missing server into a failure; elsewhere the
tests skip, saying why.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("GRADACCUM_REQUIRE_POSTGRES") == "1"
pytestmark = pytest.mark.slow


def _missing(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"GRADACCUM_REQUIRE_POSTGRES=1 but {why}")
    pytest.skip(f"no PostgreSQL here ({why}); CI installs it (apt-get install postgresql)")


def _as_server_user(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server's commands as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres_url():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if initdb is None:
        _missing("initdb was not found")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _missing("the psycopg2 driver is not installed (the postgres extra)")
    bindir = Path(initdb).parent
    # not under pytest's tmp_path: that tree is private to this user, and the server user
    # must reach its data directory and socket
    base = Path(tempfile.mkdtemp(prefix="gradaccum-postgres-"))
    os.chmod(base, 0o777)
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    os.chmod(sockets, 0o777)
    subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses='' -c unix_socket_directories={sockets} -c fsync=off"
    subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                    str(base / "log"), "-w", "-t", "60", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        subprocess.run(_as_server_user([str(bindir / "createdb"), "-h", str(sockets), "-U", "postgres",
                                        "gradaccum"]), check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://postgres@/gradaccum?host={sockets}"
    finally:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def tune_args(arm: str, trials: int, out: Path, storage: str, data_dir: str, budget: int = 1600) -> list[str]:
    """``gradaccum tune`` on the session's mnist1d cache (tests/conftest.py), generated here if no test has yet."""
    from gradaccum.experiments.mnist1d_data import load_mnist1d

    load_mnist1d(Path(data_dir) / "mnist1d.npz")
    return [sys.executable, "-m", "gradaccum.cli", "tune", "--arm", arm, "--trials", str(trials), "--budget",
            str(budget), "--eval-every", "800", "--out", str(out), "--data-dir", data_dir, "--storage",
            storage, "--quiet"]


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def test_two_workers_share_one_study_on_postgres(postgres_url: str, tmp_path: Path, data_dir: str) -> None:
    args = tune_args("gaga", 6, tmp_path, postgres_url, data_dir)
    workers = [subprocess.Popen(args, cwd=ROOT) for _ in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    study = optuna.load_study(study_name="gradaccum-gaga", storage=postgres_url)
    done = complete(study)
    assert 6 <= len(done) <= 7  # a surplus trial is pruned unless two finish at the same instant
    assert len({(t.params["lr"], t.params["tau"]) for t in done}) == len(done)  # distinct settings
    from gradaccum.experiments.tuning import counted_trials

    assert len(counted_trials(study, 6)) == 6


def test_a_killed_study_resumes_on_postgres(postgres_url: str, tmp_path: Path, data_dir: str) -> None:
    args = tune_args("baseline", 3, tmp_path, postgres_url, data_dir, budget=25600)  # ~1.5 s a trial: time to kill
    proc = subprocess.Popen(args, cwd=ROOT)
    deadline, before = time.time() + 240, {}
    while time.time() < deadline and not before:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="gradaccum-baseline", storage=postgres_url)
        except Exception:  # noqa: BLE001 - not created yet
            continue
        before = {t.number: (t.params, t.value) for t in complete(study)}
    proc.kill()
    proc.wait()
    assert 1 <= len(before) < 3
    from gradaccum.cli import main

    assert main(args[3:]) == 0  # the same command resumes, here in this process (only the kill needs its own)
    study = optuna.load_study(study_name="gradaccum-baseline", storage=postgres_url)
    after = {t.number: (t.params, t.value) for t in complete(study)}
    assert len(after) == 3 and all(after[k] == v for k, v in before.items())
    assert len({params["lr"] for params, _ in after.values()}) == 3
