"""The statistics stopping rules test, written once for every backend.

docs/design.md ("GSNR", "Norm test", "Edge cases") defines them. The functions taking
arrays use only the array API (``array_namespace``), so the core's definition is the
code the torch backend runs on tensors and JAX traces under ``jit``: the backends
cannot disagree on a window. The functions taking ``Moments`` sequences reduce to Python
floats for host-side rules and reports.

Edge cases are defined, not left to the hardware (XLA on the CPU flushes denormals to
zero, NumPy does not): an element is *live* when its variance exceeds both the smallest
normal number of its dtype and a floor relative to the whole model,
``(FLOOR_ULPS * eps)^2 * max_j E[g_j^2]`` over every element of every parameter. Below that,
the variance is rounding noise (the bias of an attention key projection has a gradient
that is zero up to rounding) and its ratio ``mu^2 / var`` would be noise too; such
elements are left out of the mean and counted, like dead units (mu = var = 0). In float32
that is an element whose gradients are 3e-5 times smaller than the largest in the model. A
parameter with a non-finite moment makes the statistic NaN, so no rule stops on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .arrays import host_array
from .moments import Moments, at_least_1

FLOOR_ULPS = 256
FLAT_BELOW = 1 << 20  # elements below which the reductions run once over all parameters, concatenated


class GSNRValue(NamedTuple):
    """Mean GSNR over the live elements, how many were live, and how many were skipped."""

    value: float
    elements: int
    skipped: int


def largest_second_moment(means: Sequence[Any], m2s: Sequence[Any], n: Any) -> Any:
    """``max_j E[g_j^2] = mu_j^2 + M2_j / n`` over every element of every parameter."""
    xp = array_namespace(means[0])
    nf = _count(n, means[0])
    largest = [xp.max(m * m + m2 / nf) for m, m2 in zip(means, m2s) if math.prod(m.shape)]
    out = largest[0]
    for x in largest[1:]:
        out = xp.maximum(out, x)
    return out


def variance_floor(mean: Any, largest: Any) -> Any:
    """The variance at or below which an element is not live (a 0-d array, > 0)."""
    xp = array_namespace(mean)
    finfo = xp.finfo(mean.dtype)
    floor = (FLOOR_ULPS * finfo.eps) ** 2 * largest
    return xp.maximum(floor, xp.asarray(finfo.smallest_normal, dtype=mean.dtype))


def live_elements(mean: Any, m2: Any, n: Any, largest: Any = None) -> Any:
    """Boolean mask of the elements whose variance is measurable (see the module docstring);
    ``largest`` is ``largest_second_moment`` over the model (default: this tensor's own)."""
    if largest is None:
        largest = largest_second_moment([mean], [m2], n)
    return m2 / at_least_1(_count(n, mean) - 1) > variance_floor(mean, largest)


def gsnr_terms(mean: Any, m2: Any, n: Any, largest: Any = None) -> tuple[Any, Any]:
    """One parameter's share of the mean GSNR: the sum of ``mu_j^2 / var_j`` over its live
    elements (NaN if any moment is not finite), and how many those are. ``n`` >= 2.

    Written without selects over the elements (they are the slow kernels): a non-live
    element's variance is raised to the floor, so its ratio is finite (at most
    ``1 / (FLOOR_ULPS eps)^2``), and multiplied by 0.
    """
    xp = array_namespace(mean, m2)
    if largest is None:
        largest = largest_second_moment([mean], [m2], n)
    floor = variance_floor(mean, largest)
    var = m2 / at_least_1(_count(n, mean) - 1)
    live = var > floor
    total = xp.sum((mean * mean) / xp.maximum(var, floor) * xp.astype(live, mean.dtype))
    finite = xp.all(xp.isfinite(mean)) & xp.all(xp.isfinite(m2))
    return xp.where(finite, total, xp.asarray(math.nan, dtype=total.dtype)), xp.sum(live)


def gsnr_value(total: Any, elements: Any, n: Any, scale: str) -> Any:
    """The mean GSNR from summed ``gsnr_terms``: 0 when no element is live (NaN stays NaN),
    times ``n`` on the mean-gradient scale."""
    xp = array_namespace(total)
    value = xp.where(elements > 0, total / at_least_1(elements), total * 0)
    return value * n if scale == "mean" else value


def gsnr_of(means: Sequence[Any], m2s: Sequence[Any], n: Any, scale: str) -> tuple[Any, Any, Any]:
    """(mean GSNR, live elements, skipped elements) over all parameters, as arrays.

    This is the definition, and the code every backend runs unless it hands its own
    implementation with its statistics (``ElementStatistics``: the torch backend's fused
    kernels); a parity test holds the two equal."""
    size = sum(math.prod(m.shape) for m in means)
    if size <= FLAT_BELOW and len(means) > 1:  # the same sums in one pass over a flat copy
        xp = array_namespace(means[0])
        means = [xp.concat([xp.reshape(m, (-1,)) for m in means])]
        m2s = [xp.concat([xp.reshape(m2, (-1,)) for m2 in m2s])]
    largest = largest_second_moment(means, m2s, n)
    terms = [gsnr_terms(m, m2, n, largest) for m, m2 in zip(means, m2s)]
    total = sum(t for t, _ in terms)
    elements = sum(c for _, c in terms)
    return gsnr_value(total, elements, n, scale), elements, size - elements


GSNRFunction = Callable[[Sequence[Any], Sequence[Any], Any, str], tuple[Any, Any, Any]]
"""An implementation of ``gsnr_of``: ``(means, m2s, n, scale) -> (value, live, skipped)``."""


class ElementStatistics(list):  # type: ignore[type-arg]
    """Per-parameter ``Moments`` (a list, in the parameters' order) with the implementation of
    ``gsnr_of`` the backend that made them runs on them.

    The torch backend hands its per-element statistics to the rules this way: its
    implementation runs fused kernels and keeps scratch buffers and the merge's maximum between
    decisions, state its statistics object owns. What the core computes on them is then
    chosen by what it is given, never by what was imported (``gsnr_function``).
    """

    def __init__(self, moments: Iterable[Moments], gsnr: GSNRFunction) -> None:
        super().__init__(moments)
        self.gsnr = gsnr


def gsnr_function(stats: Sequence[Moments]) -> GSNRFunction:
    """The implementation of ``gsnr_of`` for ``stats``: the one they came with
    (``ElementStatistics``), else the definition."""
    return stats.gsnr if isinstance(stats, ElementStatistics) else gsnr_of


def norm_test_sums(mean: Any, m2: Any) -> tuple[Any, Any]:
    """One parameter's share of the norm test: ``sum_j M2_j`` and ``sum_j mu_j^2``."""
    xp = array_namespace(mean, m2)
    return xp.sum(m2), xp.sum(mean * mean)


def norm_test_of(means: Sequence[Any], m2s: Sequence[Any], n: Any) -> tuple[Any, Any]:
    """``sum_j var_j / n`` (the variance of the mean gradient) and ``|mu|^2``, as arrays."""
    sums = [norm_test_sums(m, m2) for m, m2 in zip(means, m2s)]
    nf = _count(n, means[0])
    return sum(s for s, _ in sums) / (at_least_1(nf - 1) * nf), sum(q for _, q in sums)


def where_enough(n: Any, value: Any) -> Any:
    """``value`` where the window has at least 2 samples (a variance exists), else NaN (a Python
    NaN for a Python count and value)."""
    if type(value) in (int, float, bool):
        if isinstance(n, (int, float)):
            return value if n >= 2 else math.nan
        value = host_array(value)  # an array count: the value as a host array, as before
    xp = array_namespace(value)
    nan = xp.asarray(math.nan, dtype=value.dtype)
    if isinstance(n, int):
        return value if n >= 2 else nan
    return xp.where(n >= 2, value, nan)


def bounded_stop(n: Any, test: Any, max_samples: int, min_samples: int | None) -> Any:
    """The window bounds every sample rule shares: stop at the cap, never below
    ``max(2, min_samples)``, else as ``test`` says (bools or arrays alike)."""
    return (n >= max_samples) | ((n >= max(2, min_samples or 0)) & test)


# ------------------------------------------------------------------ host-side reductions
def mean_gsnr(stats: Sequence[Moments], scale: str) -> GSNRValue:
    """Mean over live parameter elements of ``mu_j^2 / var_j`` (``scale="sample"``, the
    per-sample GSNR of the original GAGA) or ``n * mu_j^2 / var_j`` (``scale="mean"``,
    the signal-to-noise ratio of the accumulated mean gradient itself), with the implementation
    the statistics came with (``gsnr_function``)."""
    n = sample_count(stats)
    if n < 2:
        raise ValueError(f"the GSNR needs at least 2 samples, got n={n}")
    value, elements, skipped = gsnr_function(stats)([m.mean for m in stats], [m.m2 for m in stats], n, scale)
    return GSNRValue(float(value), int(elements), int(skipped))


class NormTestValue(NamedTuple):
    """``sum_j var_j / n`` (variance of the mean gradient) and ``|mu|^2``."""

    variance_of_mean: float
    squared_norm: float


def norm_test_terms(stats: Sequence[Moments]) -> NormTestValue:
    """The two sides of the norm test (Byrd et al. 2012): stop when
    ``variance_of_mean <= theta^2 * squared_norm``."""
    n = sample_count(stats)
    if n < 2:
        raise ValueError(f"the norm test needs at least 2 samples, got n={n}")
    variance, squared = norm_test_of([m.mean for m in stats], [m.m2 for m in stats], n)
    return NormTestValue(float(variance), float(squared))


def sample_count(stats: Sequence[Moments]) -> int:
    """The number of samples the moments cover (the same for every parameter)."""
    if not stats:
        raise ValueError("statistics must hold the moments of at least one parameter")
    n = stats[0].n
    if any(m.n != n for m in stats):
        raise ValueError("every parameter's moments must cover the same samples")
    return int(n)


def _count(n: Any, like: Any) -> Any:
    xp = array_namespace(like)
    return n if isinstance(n, int) else xp.astype(n, like.dtype)



