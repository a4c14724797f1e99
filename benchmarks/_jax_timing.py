"""Shared timing loop of the JAX benchmarks: rotated rounds, medians in ms per call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_ms(runs: dict[str, tuple[Callable[[Any, Any], Any], Any]], batches: list[Any],
              rounds: int) -> dict[str, float]:
    """Median ms per ``step(carry, batch)`` call of each competitor.

    Every step is compiled and warmed up first; each round times all competitors over
    all batches, starting with a different one each round so machine noise hits all alike;
    the carry is waited for, so asynchronous dispatch is timed to completion.
    """
    carries = {n: c for n, (_, c) in runs.items()}
    for n, (step, _) in runs.items():
        carries[n] = jax.block_until_ready(step(carries[n], batches[0]))
    times: dict[str, list[float]] = {n: [] for n in runs}
    names = list(runs)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            step, carry = runs[n][0], carries[n]
            start = time.perf_counter()
            for batch in batches:
                carry = step(carry, batch)
            jax.block_until_ready(carry)
            times[n].append((time.perf_counter() - start) / len(batches) * 1e3)
            carries[n] = carry
    return {n: statistics.median(t) for n, t in times.items()}
