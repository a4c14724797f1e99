"""Runs in worker processes, one thread each, and Optuna studies tuned in deterministic rounds.

Every run of the experiment trains a tiny model, so one thread per run and as many runs as
cores beat one process with several threads, and stay fast when the machine is shared
(two-thread runs slowed 20-60x under oversubscription; one-thread runs 2-3x). Workers are
started with ``spawn`` and ``OMP_NUM_THREADS=1``.

Tuning in rounds keeps a run reproducible whatever the timing: a study asks a batch of
``processes`` trials at once, each suggested from the trials completed in earlier batches only
(its sampler seeded by the trial's number), and asks the next batch when the whole batch is
told. Several studies run side by side, so the workers stay busy.

The workers die with the process that started them (Linux: ``PR_SET_PDEATHSIG``; elsewhere a
thread watching the parent's pid), so a killed run leaves no orphan computing; they ignore
Ctrl-C, which the parent handles by failing its in-flight trials and ending them at once.
The parent owns every trial its workers compute and records their heartbeats
(``study_storage``): another process fails one only after the parent is gone.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .files import write_atomic
from .study_storage import Heartbeats, ask, fail_stale
from .tuning import diverged_limit, finish, tell_failed


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@contextmanager
def one_thread() -> Iterator[None]:
    """Compute on one thread in this process, as every worker does (the command line's
    training commands run in it); the previous thread count is restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """End this process when ``parent`` dies: the kernel's parent-death signal on Linux, a
    thread polling the parent's pid elsewhere; if the parent is already gone, end now."""
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="gradaccum-parent-watch", daemon=True).start()


def _worker_start(parent: int) -> None:
    """A worker: one thread, Ctrl-C left to the parent, dead with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    _one_thread()


class _Pool(ProcessPoolExecutor):
    """A process pool whose workers are ended at once when the ``with`` block raises (Ctrl-C, an
    error): leaving the block no longer waits for the running jobs to finish."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            return bool(super().__exit__(exc_type, exc, tb))
        self.terminate()
        return False

    def terminate(self) -> None:
        processes = list((getattr(self, "_processes", None) or {}).values())
        self.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=5)


class InlineExecutor(Executor):
    """Runs each job at once in this process (``workers=1``: no process to start), on one thread
    as a worker would; the thread count it found is restored at ``shutdown`` (the end of its
    ``with`` block)."""

    def __init__(self) -> None:
        import torch

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        import torch

        torch.set_num_threads(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller through the future, as a pool would
            future.set_exception(error)
        return future


def executor(processes: int) -> Executor:
    """A pool of ``processes`` one-thread workers (the same code inline for 1)."""
    if processes == 1:
        return InlineExecutor()
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the workers' OpenMP when they start
    # Ctrl-C is the parent's: a worker ignores it from its first instruction (an ignored signal
    # stays ignored across the exec that starts it), not only once its imports are done
    main = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        pool = _Pool(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                     initargs=(os.getpid(),))
        for started in [pool.submit(int) for _ in range(processes)]:  # every worker started now, as set up here
            started.result()
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return pool


def run_all(pool: Executor, fn: Callable[..., Any], jobs: Sequence[tuple], on_done: Callable[[], None] = lambda: None
            ) -> list[Any]:
    """``fn(*job)`` for every job on the pool; the results in the jobs' order. The first error
    cancels what has not started and is raised."""
    futures = [pool.submit(fn, *job) for job in jobs]
    try:
        for future in _as_completed(futures):
            future.result()
            on_done()
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return [f.result() for f in futures]


TRAINING_IRRELEVANT = ("out", "quiet", "workers", "storage", "n_jobs", "sections", "seeds", "arms", "trials",
                       "front_trials")
"""Settings a run's result does not depend on (given its arm, parameters and seed)."""


def run_key(task: str, job: tuple) -> str:
    """A name for one run, from what its result depends on: the task, arm, parameters, seed and
    the settings training reads."""
    arm, params, seed, _, cfg = job
    settings = {k: v for k, v in cfg.to_dict().items() if k not in TRAINING_IRRELEVANT}
    text = json.dumps([task, arm, params, seed, settings], sort_keys=True)
    return f"{arm}-{seed}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def run_reusing(pool: Executor, fn: Callable[..., Any], jobs: Sequence[tuple], task: str, cache: Path | None,
                on_done: Callable[[], None] = lambda: None) -> tuple[list[dict[str, Any]], list[bool]]:
    """``fn(*job).as_dict()`` for every job, the records in the jobs' order, and for each whether
    it was reused: a run whose record ``cache`` holds (from an earlier, interrupted or finished
    call) is read back instead of trained again; each new record is written there as soon as its
    run ends (whole or not at all). ``cache=None`` trains every run and keeps nothing."""
    records: list[dict[str, Any] | None] = [None] * len(jobs)
    paths = [cache / f"{run_key(task, job)}.json" for job in jobs] if cache is not None else [None] * len(jobs)
    for k, path in enumerate(paths):
        if path is not None and path.exists():
            try:
                records[k] = json.loads(path.read_text())
            except (OSError, ValueError):
                records[k] = None  # unreadable: trained again
    reused = [r is not None for r in records]
    for _ in range(sum(reused)):
        on_done()
    missing = [k for k, r in enumerate(records) if r is None]
    futures = {pool.submit(fn, *jobs[k]): k for k in missing}
    try:
        for future in _as_completed(list(futures)):
            k = futures[future]
            records[k] = future.result().as_dict()
            path = paths[k]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(records[k]) + "\n")
            on_done()
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return [r for r in records if r is not None], reused


def _as_completed(futures: Iterable[Future]) -> Iterable[Future]:
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        yield from done


@dataclass
class Tuning:
    """One study to tune: ``suggest(trial) -> params``, ``job(params, number) -> args of fn``,
    ``tell(trial_result) -> value(s) or None`` (None: pruned, with the reason ``pruned(result)``)."""

    study: optuna.Study
    target: int
    suggest: Callable[[optuna.Trial], dict[str, float]]
    job: Callable[[dict[str, float], int], tuple]
    value: Callable[[Any], Any]
    pruned: Callable[[Any], str | None]
    attributes: Callable[[Any], dict[str, Any]]
    sampler: Callable[[int], optuna.samplers.BaseSampler]
    too_many_diverged: Callable[[int], BaseException]
    """The error to raise after ``diverged_limit`` diverged trials in a row (their count given)."""


def complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def tune_in_rounds(pool: Executor, fn: Callable[..., Any], tunings: Sequence[Tuning], batch: int,
                   on_trial: Callable[[], None] = lambda: None) -> None:
    """Tune every study to its target of complete trials, ``batch`` trials per round each.

    Trials left RUNNING by a process that is gone are failed first (never a live owner's). A
    study whose last ``diverged_limit(batch)`` trials all diverged stops everything with its
    ``too_many_diverged`` error. On any error or Ctrl-C, the in-flight trials are failed."""
    flights: dict[Future, tuple[int, optuna.Trial]] = {}
    in_round: dict[int, int] = {}
    diverged: dict[int, int] = {}
    for tuning in tunings:
        fail_stale(tuning.study)
    with Heartbeats() as heartbeats:
        try:
            while True:
                for k, tuning in enumerate(tunings):
                    missing = tuning.target - complete(tuning.study)
                    if in_round.get(k, 0) == 0 and missing > 0:
                        trials = [ask(tuning.study) for _ in range(min(batch, missing))]
                        for trial in trials:  # every suggestion of the round from the same history
                            heartbeats.add(tuning.study, trial)
                            tuning.study.sampler = tuning.sampler(trial.number)
                            params = tuning.suggest(trial)
                            flights[pool.submit(fn, *tuning.job(params, trial.number))] = (k, trial)
                        in_round[k] = len(trials)
                if not flights:
                    return
                done, _ = wait(list(flights), return_when=FIRST_COMPLETED)
                for future in done:
                    k, trial = flights.pop(future)
                    tuning = tunings[k]
                    try:
                        result = future.result()
                    except BaseException:
                        tell_failed(tuning.study, trial)
                        raise
                    reason = tuning.pruned(result)
                    if reason is not None:
                        finish(tuning.study, trial, {**tuning.attributes(result), "pruned": reason},
                               state=TrialState.PRUNED)
                    else:
                        finish(tuning.study, trial, tuning.attributes(result), value=tuning.value(result))
                    heartbeats.remove(trial)
                    in_round[k] -= 1
                    diverged[k] = diverged.get(k, 0) + 1 if reason == "diverged" else 0
                    on_trial()
                    if diverged[k] >= diverged_limit(batch):
                        raise tuning.too_many_diverged(diverged[k])
        except BaseException:
            for future, (k, trial) in flights.items():
                future.cancel()
                tell_failed(tunings[k].study, trial)
            raise
