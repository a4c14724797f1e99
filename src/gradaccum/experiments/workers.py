"""Runs in worker processes, one thread each, and Optuna studies tuned in deterministic rounds.

Every run of the experiment trains a tiny model, so one thread per run and as many runs as
cores beat one process with several threads, and stay fast when the machine is shared
(two-thread runs slowed 20-60x under oversubscription; one-thread runs 2-3x). Workers are
started with ``spawn`` and ``OMP_NUM_THREADS=1``.

Tuning in rounds keeps a run reproducible whatever the timing: a study asks a batch of
``processes`` trials at once, each suggested from the trials completed in earlier batches only
(its sampler seeded by the trial's number), and asks the next batch when the whole batch is
told. Several studies run side by side, so the workers stay busy.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import optuna
from optuna.trial import TrialState


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


class InlineExecutor(Executor):
    """Runs each job at once in this process (``workers=1``: no process to start)."""

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
        _one_thread()
        return InlineExecutor()
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the workers' OpenMP when they start
    try:
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)
        pool.submit(int).result()  # start the workers now, while the variable is set
    finally:
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


def complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def fail_stale(study: optuna.Study) -> None:
    """Trials left RUNNING by a run that was killed are failed, so that they are asked again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)


def tune_in_rounds(pool: Executor, fn: Callable[..., Any], tunings: Sequence[Tuning], batch: int,
                   on_trial: Callable[[], None] = lambda: None) -> None:
    """Tune every study to its target of complete trials, ``batch`` trials per round each."""
    flights: dict[Future, tuple[int, optuna.Trial]] = {}
    in_round: dict[int, int] = {}
    for tuning in tunings:
        fail_stale(tuning.study)
    try:
        while True:
            for k, tuning in enumerate(tunings):
                missing = tuning.target - complete(tuning.study)
                if in_round.get(k, 0) == 0 and missing > 0:
                    trials = [tuning.study.ask() for _ in range(min(batch, missing))]
                    for trial in trials:  # every suggestion of the round from the same history
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
                    tuning.study.tell(trial, state=TrialState.FAIL)
                    raise
                for key, value in tuning.attributes(result).items():
                    trial.set_user_attr(key, value)
                reason = tuning.pruned(result)
                if reason is not None:
                    trial.set_user_attr("pruned", reason)
                    tuning.study.tell(trial, state=TrialState.PRUNED)
                else:
                    tuning.study.tell(trial, tuning.value(result))
                in_round[k] -= 1
                on_trial()
    except BaseException:
        for future, (k, trial) in flights.items():
            future.cancel()
            tunings[k].study.tell(trial, state=TrialState.FAIL)
        raise
