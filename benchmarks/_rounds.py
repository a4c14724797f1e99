"""Shared timing loop of the side-by-side benchmarks: warm-up, then interleaved rounds."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_seconds(runners: list[Callable[[], object]], rounds: int, windows: int) -> list[list[float]]:
    """Seconds per window of each runner in each round (each call runs ``windows`` windows and
    returns when its work is done). Every runner runs once first (allocations, compilation);
    each round then runs every runner once, starting with a different one each round so the
    machine's noise hits all of them alike."""
    for run in runners:
        run()
    times: list[list[float]] = [[] for _ in runners]
    for r in range(rounds):
        for i in range(len(runners)):
            which = (i + r) % len(runners)
            start = time.perf_counter()
            runners[which]()
            times[which].append((time.perf_counter() - start) / windows)
    return times
