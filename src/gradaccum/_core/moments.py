"""Per-element running moments of per-sample gradients, merged stably.

Everything here is plain arithmetic on whatever array type the backend hands in
(NumPy, torch or jax arrays all work), so both backends share one implementation.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations (M2) of per-sample gradients.

    Attributes:
      n: number of samples (a Python int, the same for every element).
      mean: per-element mean of the per-sample gradients.
      m2: per-element sum of squared deviations from the mean.
    """

    n: int
    mean: Any
    m2: Any


def moments_from_sums(n: int, sum_: Any, sum_sq: Any) -> Moments:
    """Moments of one increment from its sum and sum of squares.

    The backend should form these in float64 (or from the per-sample gradients
    directly): ``sum_sq - n * mean**2`` cancels when the signal is strong. Across
    increments, ``merge`` keeps the result stable.
    """
    mean = sum_ / n
    m2 = sum_sq - sum_ * mean
    return Moments(n, mean, m2 * (m2 > 0))  # rounding can leave tiny negatives


def merge(a: Moments | None, b: Moments) -> Moments:
    """Chan et al.'s parallel update: the moments of the union of two sample sets.

    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n`` never subtracts two large sums,
    unlike ``S2 - n * mu^2``, which loses every digit exactly when GSNR is high.
    """
    if a is None or a.n == 0:
        return b
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / n)
    return Moments(n, mean, m2)


def variance(m: Moments) -> Any:
    """Unbiased per-element variance ``M2 / (n - 1)`` (requires n >= 2)."""
    if m.n < 2:
        raise ValueError(f"variance needs at least 2 samples, got n={m.n}")
    return m.m2 / (m.n - 1)
