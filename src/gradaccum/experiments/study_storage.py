"""Optuna storage for the experiment: who may fail a trial, and a journal file a torn line cannot destroy.

**Owners and heartbeats.** A process that runs a trial (``gradaccum tune``, or ``reproduce``'s
parent for the trials its workers compute) records a heartbeat for it every
``HEARTBEAT_SECONDS`` (``Heartbeats``). A RUNNING trial may be failed by another process only
when its owner is gone: no heartbeat for ``GRACE_SECONDS`` (``fail_stale``). SQLite and
PostgreSQL use Optuna's own heartbeats (``RDBStorage(heartbeat_interval=, grace_period=)``,
timed by the database's clock); the journal file records them as a trial system attribute,
timed by the machine's clock (a journal file is shared on one machine only). A trial that was
RUNNING before heartbeats were recorded is never failed: nobody can tell whether its owner lives.

**The journal's tail.** Optuna's JournalFileBackend appends one JSON line per operation under
its lock file. A writer killed mid-line, or a full disk (ENOSPC) after part of a line, leaves
half a record at the end; Optuna reads past it, but the next append glues a whole record to it
and from then on the journal is unreadable. ``TornTailJournalBackend`` appends under the same
lock, and before appending cuts a tail that does not end in a newline (a writer holding the lock
is the only one who may be mid-line, and while we hold it, nobody is); a write that fails part-way
is cut back to the size it had, so a failed append changes nothing. The one case the lock cannot
cover: Optuna breaks a lock whose journal has not changed for its grace period (30 s), so a writer
stalled for that long inside one append could lose its line.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import warnings
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file
from optuna.trial import TrialState

HEARTBEAT_SECONDS = 10
"""How often an owner records a heartbeat for each trial it runs."""
GRACE_SECONDS = 60
"""A RUNNING trial without a heartbeat for this long has lost its owner and may be failed."""
_HEARTBEAT_KEY = "gradaccum:heartbeat"
_CHUNK = 1 << 16


def open_storage(url: str) -> Any:
    """An Optuna storage with heartbeats: an RDB URL (``sqlite:///...``, ``postgresql://...``)
    or ``journal:PATH`` (a journal file several processes on one machine can share)."""
    if url.startswith("journal:"):
        return HeartbeatJournalStorage(TornTailJournalBackend(url[len("journal:"):]))
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


class TornTailJournalBackend(JournalFileBackend):
    """Optuna's journal file whose appends first cut a torn last line and never leave one."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        with get_lock_file(self._lock):
            fd = os.open(self._file_path, os.O_RDWR | os.O_APPEND)
            try:
                size = cut_torn_tail(fd, self._file_path)
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except BaseException:
                    os.ftruncate(fd, size)  # the part written goes: the journal is as it was
                    os.fsync(fd)
                    raise
            finally:
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def cut_torn_tail(fd: int, path: str) -> int:
    """Cut the last line of the journal open at ``fd`` if it lacks its newline; the new size.

    Call it holding the journal's lock: then no writer is mid-line, and the torn line is what a
    writer that died or failed left (never a record Optuna read: it reads only whole lines)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    keep = 0
    while end > 0:
        start = max(0, end - _CHUNK)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    os.ftruncate(fd, keep)
    os.fsync(fd)
    warnings.warn(f"storage: {path} ended in a torn record ({size - keep} bytes without a newline, left by a "
                  "writer that was killed or ran out of disk space); cut it before appending. Every whole record "
                  "is kept.", RuntimeWarning, stacklevel=2)
    return keep


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with heartbeats, so that ``fail_stale`` fails only trials whose
    owner is gone (a heartbeat is a trial system attribute: the time of the last beat)."""

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, _HEARTBEAT_KEY, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if _HEARTBEAT_KEY in t.system_attrs and now - float(t.system_attrs[_HEARTBEAT_KEY]) > GRACE_SECONDS]

    def get_heartbeat_interval(self) -> int:
        return HEARTBEAT_SECONDS

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``; the heartbeats this module records make Optuna's warning that heartbeats
    need ``Study.optimize`` moot."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose owner is gone (no heartbeat for ``GRACE_SECONDS``), so that
    they are asked again; a live owner's trial is left alone. Returns the failed trials' numbers."""
    storage: BaseStorage = study._storage
    if not isinstance(storage, BaseHeartbeat) or storage.get_heartbeat_interval() is None:
        return []
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(storage.get_trial(trial_id).number)
        except UpdateFinishedTrialError:  # its owner, or another process, finished it meanwhile
            pass
    return failed


class Heartbeats:
    """One thread that records a heartbeat for every trial this process owns, every
    ``HEARTBEAT_SECONDS`` (and at once when a trial is added). A failed beat (a full disk, a
    lost connection) is retried at the next; a trial another process finished is dropped."""

    def __init__(self) -> None:
        self._owned: dict[int, BaseStorage] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, study: optuna.Study, trial: optuna.Trial) -> None:
        storage = study._storage
        if not isinstance(storage, BaseHeartbeat) or storage.get_heartbeat_interval() is None:
            return
        trial_id = trial._trial_id
        self._beat(trial_id, storage)
        with self._lock:
            self._owned[trial_id] = storage
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gradaccum-heartbeats", daemon=True)
                self._thread.start()

    def remove(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._owned.pop(trial._trial_id, None)

    def _beat(self, trial_id: int, storage: Any) -> None:
        try:
            storage.record_heartbeat(trial_id)
        except UpdateFinishedTrialError:
            with self._lock:
                self._owned.pop(trial_id, None)
        except Exception:  # noqa: BLE001 - a missed beat is retried; the trial's own writes report errors
            pass

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                owned = list(self._owned.items())
            for trial_id, storage in owned:
                self._beat(trial_id, storage)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Heartbeats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def root_cause(error: BaseException) -> str:
    """The text of the error at the bottom of ``error``'s chain: Optuna reports any failed commit
    as "invalid data in the commit", while the database's own error (a full disk, a lost
    connection) is its cause."""
    seen = {id(error)}
    while True:
        nxt = error.__cause__ or error.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        error = nxt
    text = f"{type(error).__name__}: {error}"
    disk_full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "disk is full" in str(error) \
        or "No space left" in str(error)
    return text + ("; the disk is full: free space and rerun (finished trials are kept)" if disk_full else "")


def drop_if_finished(action: Any, *args: Any, **kwargs: Any) -> bool:
    """Run a trial update; False (and a warning) when another process failed the trial because its
    heartbeats stopped (a process stalled past the grace period): its result is dropped."""
    try:
        action(*args, **kwargs)
        return True
    except UpdateFinishedTrialError as error:
        warnings.warn(f"storage: {error}: another process failed this trial after {GRACE_SECONDS} s without a "
                      "heartbeat; its result is dropped", RuntimeWarning, stacklevel=2)
        return False
