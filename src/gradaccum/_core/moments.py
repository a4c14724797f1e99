"""Per-element running moments of per-sample gradients, merged stably.

The formulas are written once against the array API (``array_namespace`` of
array-api-compat), so NumPy, torch and jax.numpy arrays all run the same code and JAX
traces it under ``jit`` (docs/design.md, "Moments"). A backend may run a fused or
in-place implementation of the same definition on its hot path; a parity test holds
the two equal.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from array_api_compat import array_namespace


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations (M2) of per-sample gradients.

    Attributes:
      n: number of samples (a Python int or an integer array, the same for every element).
      mean: per-element mean of the per-sample gradients.
      m2: per-element sum of squared deviations from the mean.
    """

    n: Any
    mean: Any
    m2: Any


def moments_from_sums(n: Any, sum_: Any, sum_sq: Any) -> Moments:
    """Moments of one increment from its sum and sum of squares (n >= 1).

    ``sum_sq - sum * mean`` cancels when the signal is strong, so the sums should come
    from per-sample gradients of one increment only; across increments ``merge`` keeps
    the result stable. Rounding can leave tiny negatives: they are clamped to 0.
    """
    xp = array_namespace(sum_)
    mean = sum_ / _like(n, sum_)
    m2 = sum_sq - sum_ * mean
    return Moments(n, mean, xp.where(m2 > 0, m2, xp.zeros_like(m2)))


def chan_merge(n_a: Any, mean_a: Any, m2_a: Any, n_b: Any, mean_b: Any, m2_b: Any) -> Moments:
    """Chan et al.'s parallel update: the moments of the union of two sample sets.

    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n`` never subtracts two large sums, unlike
    ``S2 - n * mu^2``, which loses every digit exactly when the GSNR is high. Either set
    may be empty (n = 0): the other is returned unchanged, also when counts are traced.
    """
    n = n_a + n_b
    w = _like(n_b, mean_b) / _like(at_least_1(n), mean_b)
    delta = mean_b - mean_a
    return Moments(n, mean_a + delta * w, m2_a + m2_b + delta * delta * (_like(n_a, mean_b) * w))


def merge(a: Moments | None, b: Moments) -> Moments:
    """The moments of the union of two sample sets (``a`` may be None: nothing yet)."""
    if a is None:
        return b
    return chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2)


def variance(m: Moments) -> Any:
    """Unbiased per-element variance ``M2 / (n - 1)`` (requires n >= 2)."""
    if m.n < 2:
        raise ValueError(f"variance needs at least 2 samples, got n={m.n}")
    return m.m2 / (m.n - 1)


def _like(value: Any, like: Any) -> Any:
    """A count as an array of ``like``'s dtype and device (ints and int arrays alike)."""
    xp = array_namespace(like)
    if isinstance(value, (int, float)):
        return xp.asarray(value, dtype=like.dtype, device=_device(like))
    return xp.astype(value, like.dtype)


def at_least_1(n: Any) -> Any:
    """``max(n, 1)`` for a Python number or an array (a divisor that is never 0)."""
    if isinstance(n, (int, float)):
        return max(n, 1)
    xp = array_namespace(n)
    return xp.maximum(n, xp.ones_like(n))


def _device(x: Any) -> Any:
    from array_api_compat import device

    return device(x)
