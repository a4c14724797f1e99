"""The statistics that stopping rules test, from per-parameter ``Moments``.

DESIGN.md sections 2 and 3 define them. Each function reduces over every parameter
element and returns Python floats, so rules can compare them with thresholds
whatever backend produced the moments. The functions here are the readable,
array-agnostic definitions; a backend may hand the rules a sequence of moments that
also has ``mean_gsnr(scale)`` and ``norm_test_terms()`` methods computing the same
numbers in fewer passes, and then those are used (the tests hold both to agree).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

from .moments import Moments


class GSNRValue(NamedTuple):
    """Mean GSNR over the elements with non-zero variance, and how many were skipped."""

    value: float
    elements: int
    skipped: int


def mean_gsnr(stats: Sequence[Moments], scale: str) -> GSNRValue:
    """Mean over parameter elements of ``mu_j^2 / var_j`` (``scale="sample"``, the
    per-sample GSNR of the original GAGA) or ``n * mu_j^2 / var_j`` (``scale="mean"``,
    the signal-to-noise ratio of the accumulated mean gradient itself).

    Elements whose variance is exactly zero are left out of the mean and counted in
    ``skipped``: they are units no sample moves (a dead ReLU gives mu = var = 0, so the
    ratio is undefined), and counting them as 0 or as infinite would let dead units
    decide the window.
    """
    fast = getattr(stats, "mean_gsnr", None)
    if fast is not None:
        return fast(scale)
    total, elements, skipped = 0.0, 0, 0
    n = sample_count(stats)
    if n < 2:
        raise ValueError(f"the GSNR needs at least 2 samples, got n={n}")
    for m in stats:
        ratio_sum, count = gsnr_terms(m.mean, m.m2, n)
        total += float(ratio_sum)
        elements += int(count)
        skipped += math.prod(m.mean.shape) - int(count)
    return GSNRValue(gsnr_value(total, elements, n, scale), elements, skipped)


def gsnr_terms(mean: Any, m2: Any, n: Any) -> tuple[Any, Any]:
    """One parameter's share of the mean GSNR: the sum of ``mu_j^2 / var_j`` over its
    elements with ``var_j > 0``, and how many those are.

    Only array arithmetic, so the JAX backend traces the same formula under ``jit``;
    ``n`` (>= 2) may be a traced count.
    """
    var = m2 / (n - 1)
    valid = var > 0
    ratio = (mean * mean) / (var + ~valid) * valid
    return ratio.sum(), valid.sum()


def gsnr_value(total: Any, elements: Any, n: Any, scale: str) -> Any:
    """The mean GSNR from summed ``gsnr_terms``: 0 when every element had zero variance,
    times ``n`` on the mean-gradient scale."""
    value = total / (elements + (elements == 0)) * (elements > 0)
    return value * n if scale == "mean" else value


class NormTestValue(NamedTuple):
    """``sum_j var_j / n`` (variance of the mean gradient) and ``|mu|^2``."""

    variance_of_mean: float
    squared_norm: float


def norm_test_terms(stats: Sequence[Moments]) -> NormTestValue:
    """The two sides of the norm test (Byrd et al. 2012): stop when
    ``variance_of_mean <= theta^2 * squared_norm``."""
    fast = getattr(stats, "norm_test_terms", None)
    if fast is not None:
        return fast()
    n = sample_count(stats)
    trace, squared = 0.0, 0.0
    for m in stats:
        m2_sum, mean_sq = norm_test_sums(m.mean, m.m2)
        trace += float(m2_sum)
        squared += float(mean_sq)
    return NormTestValue(trace / (n - 1) / n, squared)


def norm_test_sums(mean: Any, m2: Any) -> tuple[Any, Any]:
    """One parameter's share of the norm test: ``sum_j M2_j`` and ``sum_j mu_j^2``
    (array arithmetic only, traceable like ``gsnr_terms``)."""
    return m2.sum(), (mean * mean).sum()


def sample_count(stats: Sequence[Moments]) -> int:
    """The number of samples the moments cover (the same for every parameter)."""
    if not stats:
        raise ValueError("statistics must hold the moments of at least one parameter")
    n = stats[0].n
    if any(m.n != n for m in stats):
        raise ValueError("every parameter's moments must cover the same samples")
    return n
