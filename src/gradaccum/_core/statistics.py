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
from typing import NamedTuple, Sequence

from .moments import Moments, variance


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
    for m in stats:
        var = variance(m)
        valid = var > 0
        ratio = (m.mean * m.mean) / (var + (~valid)) * valid
        count = int(valid.sum())
        total += float(ratio.sum())
        elements += count
        skipped += math.prod(valid.shape) - count
    if elements == 0:
        return GSNRValue(0.0, 0, skipped)
    value = total / elements
    return GSNRValue(value * n if scale == "mean" else value, elements, skipped)


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
    trace = sum(float(variance(m).sum()) for m in stats)
    squared = sum(float((m.mean * m.mean).sum()) for m in stats)
    return NormTestValue(trace / n, squared)


def sample_count(stats: Sequence[Moments]) -> int:
    """The number of samples the moments cover (the same for every parameter)."""
    if not stats:
        raise ValueError("statistics must hold the moments of at least one parameter")
    n = stats[0].n
    if any(m.n != n for m in stats):
        raise ValueError("every parameter's moments must cover the same samples")
    return n
