"""The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

From a window of n per-sample gradients with mean ``mu`` and per-element M2
(docs/design.md, "Noise scale"):

    tr(Sigma) ~ sum_j M2_j / (n - 1)          unbiased
    |G|^2     ~ |mu|^2 - tr(Sigma) / n         unbiased (can be <= 0 for one window)

The norm path gathers the same two terms without per-element moments: the sum over the
window's samples of their squared gradient norms, ``T2 = sum_i |g_i|^2``, and the squared norm
of the window's gradient sum ``|S1|^2``, so that ``sum_j M2_j = T2 - |S1|^2 / n``
(``NormSums``). Under data parallelism each process has its own window; the per-process
sums add up, and ``pooled_terms`` turns the totals into unbiased estimates (McCandlish et
al. 2018, appendix A) with one small all-reduce of five scalars instead of two
parameter-sized tensors (docs/design.md, "Norm path").

One window's estimate is noisy, and its ``|G|^2`` can be negative: numerator and
denominator are averaged separately (an exponential moving average) before dividing, as the
anchors do, and a non-positive averaged ``|G|^2`` gives an infinite noise scale (all noise,
no signal), never a division by it. ``NoiseScaleEMA`` is the one moving average of the
noise terms: the planners (on step records and in a traced JAX step) and ``MonitorLog`` run it.
Array-API code: the backends run it as written, and the host runs the same code on Python
numbers (``arrays``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .arrays import host_array, is_python, namespace, python, ratio_or_inf
from .moments import at_least_1
from .validation import check_positive_float


class NoiseTerms(NamedTuple):
    """Unbiased estimates of ``tr(Sigma)`` and ``|G|^2`` from one window."""

    trace: Any
    squared_norm: Any


def noise_terms(n: Any, means: Sequence[Any], m2s: Sequence[Any]) -> NoiseTerms:
    """``tr(Sigma)`` and ``|G|^2`` from a window's moments (n >= 2 samples; for fewer the
    trace is 0 and the caller's ``where_enough`` makes the statistic NaN)."""
    xp = array_namespace(means[0])
    nf = n if isinstance(n, int) else xp.astype(n, means[0].dtype)
    trace = sum(xp.sum(m2) for m2 in m2s) / at_least_1(nf - 1)
    mean_sq = sum(xp.sum(m * m) for m in means)
    return NoiseTerms(trace, mean_sq - trace / at_least_1(nf))


class NormSums(NamedTuple):
    """A window's norm statistics on one process, summable over processes (elementwise).

    Attributes:
      samples: n, the samples of the window.
      m2: ``sum_j M2_j = T2 - |S1|^2 / n``, the summed squared deviations of the per-sample
        gradients from the process's own window mean.
      dof: ``n - 1`` (0 for an empty window): the degrees of freedom of ``m2``.
      squared: ``|S1|^2 / n`` (0 for an empty window), whose expectation is ``n |G|^2 + tr(Sigma)``.
      groups: 1 when the process has samples, else 0.
    """

    samples: float
    m2: float
    dof: float
    squared: float
    groups: float

    @classmethod
    def of(cls, n: int, sum_squared_norms: float, squared_sum: float) -> NormSums:
        """From the window's sample count, ``T2 = sum_i |g_i|^2`` and ``|S1|^2`` (Python floats).

        Rounding can leave ``T2 - |S1|^2 / n`` slightly below 0 when the samples agree; it
        is clamped to 0."""
        if n == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(float(n), max(sum_squared_norms - squared_sum / n, 0.0), float(n - 1), squared_sum / n, 1.0)

    def __add__(self, other: tuple[float, ...]) -> NormSums:  # type: ignore[override]
        return NormSums(*(a + b for a, b in zip(self, other)))


class NormStatistics(NamedTuple):
    """What a norm rule reads (``WindowView.statistics`` on the norm path): the window's
    samples and the unbiased estimates of ``tr(Sigma)`` and ``|G|^2``."""

    samples: int
    trace: float
    squared_norm: float


def window_terms(n: Any, sum_squared_norms: Any, squared_sum: Any) -> NoiseTerms:
    """``tr(Sigma)`` and ``|G|^2`` of one process's window from ``T2 = sum_i |g_i|^2`` and
    ``|S1|^2``, as array code (a traced JAX step runs it): ``pooled_terms`` of the window's
    ``NormSums``. Fewer than 2 samples give a trace of 0; the rules' ``where_enough`` makes
    their statistic NaN there. Python numbers give Python floats."""
    host = is_python(sum_squared_norms, squared_sum)
    xp = namespace(sum_squared_norms, squared_sum)
    sum_squared_norms, squared_sum = host_array(sum_squared_norms), host_array(squared_sum)
    nf = n if isinstance(n, (int, float)) else xp.astype(n, sum_squared_norms.dtype)
    per_sample = squared_sum / at_least_1(nf)  # |S1|^2 / n
    m2 = sum_squared_norms - per_sample
    m2 = xp.maximum(m2, xp.zeros_like(m2))
    trace = m2 / at_least_1(nf - 1)
    terms = NoiseTerms(trace, (per_sample - trace) / at_least_1(nf))
    return NoiseTerms(python(terms.trace), python(terms.squared_norm)) if host else terms


def pooled_terms(sums: NormSums) -> NormStatistics:
    """Unbiased ``tr(Sigma)`` (the pooled within-process variance) and ``|G|^2`` from the
    norm sums added over processes; on one process they are ``noise_terms`` of the window.

    ``E[|S1_r|^2 / n_r] = n_r |G|^2 + tr(Sigma)`` for each process r, so
    ``|G|^2 = (sum_r |S1_r|^2 / n_r - groups * tr(Sigma)) / n``. A window with fewer than two
    samples per process in total has no variance: the trace is NaN."""
    n = int(sums.samples)
    trace = sums.m2 / sums.dof if sums.dof > 0 else math.nan
    squared = (sums.squared - sums.groups * trace) / n if n > 0 else math.nan
    return NormStatistics(n, trace, squared)


def layer_noise_scales(layers: dict[str, NormSums]) -> dict[str, float]:
    """``{"noise_scale/<layer>": B_simple}`` from per-layer norm sums (layers with >= 2 samples)."""
    out = {}
    for name, sums in layers.items():
        terms = pooled_terms(sums)
        if terms.samples >= 2:
            out[f"noise_scale/{name}"] = noise_scale(terms.trace, terms.squared_norm)
    return out


def noise_scale(trace: Any, squared_norm: Any) -> Any:
    """``tr(Sigma) / |G|^2``; infinite when ``|G|^2 <= 0`` (no measurable signal). Python
    numbers or arrays (``arrays.ratio_or_inf``)."""
    return ratio_or_inf(trace, squared_norm)


def averaged(total: Any, weight: Any) -> tuple[Any, Any]:
    """A moving average not yet divided by its ``weight`` (``NoiseScaleEMA.update``), divided
    (dividing by 1 where nothing was averaged yet), and where something was: ``weight > 0``.
    Array code (host numbers as NumPy float64 0-d arrays)."""
    xp = namespace(total, weight)
    weight = host_array(weight)
    seen = weight > 0
    return host_array(total) / xp.where(seen, weight, xp.ones_like(weight)), seen


def averaged_noise_scale(trace: Any, squared: Any, weight: Any) -> Any:
    """``B_simple`` of the moving averages of the noise terms (not yet divided by their common
    ``weight``): NaN before any window counted (weight 0), infinite where the averaged ``|G|^2``
    is not positive, never a division by it. Python numbers give a Python float; arrays an array."""
    if is_python(trace, squared, weight):  # Python's float64 arithmetic, as NumPy's, without arrays
        return ratio_or_inf(trace / weight, squared / weight) if weight > 0 else math.nan
    xp = namespace(trace, squared, weight)
    (trace, seen), (squared, _) = averaged(trace, weight), averaged(squared, weight)
    ratio = ratio_or_inf(trace, squared)
    return xp.where(seen, ratio, xp.asarray(math.nan, dtype=ratio.dtype))


@dataclass(frozen=True)
class NoiseScaleEMA:
    """Exponential moving averages of ``tr(Sigma)`` and ``|G|^2`` over windows, then their ratio.

    ``decay`` is the weight of the past (0.9: about the last 10 windows count). The first
    window initialises both averages (a bias-corrected EMA, as Adam corrects its moments).
    The one moving average of the library: the planners (``planners.summarize`` on step
    records, ``planners.after_window`` in a traced JAX step) and ``MonitorLog`` run ``update``.
    """

    decay: float = 0.9

    def __post_init__(self) -> None:
        check_positive_float("decay", self.decay)
        if self.decay >= 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")

    def update(self, averages: Sequence[Any], values: Sequence[Any]) -> tuple[Any, ...]:
        """The moving averages after one more window: each ``decay * average + (1 - decay) * value``,
        the newest window weighing ``1 - decay``. Averages start at 0 and are not yet divided by
        their weight: averaging a value of 1 alongside gives it (``1 - decay^k`` after k windows),
        the bias correction. Python numbers and arrays alike (plain arithmetic, traceable)."""
        return tuple(self.decay * a + (1 - self.decay) * v for a, v in zip(averages, values))

    def sums(self, terms: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
        """``(trace, squared_norm, weight)``: the moving averages of ``terms`` (oldest first),
        not yet divided by their weight."""
        trace = squared = weight = 0.0
        for t, g in terms:
            trace, squared, weight = self.update((trace, squared, weight), (t, g, 1.0))
        return trace, squared, weight

    def average(self, terms: Sequence[tuple[float, float]]) -> tuple[float, float]:
        """The bias-corrected EMAs of (trace, squared_norm) over ``terms``, oldest first (NaN
        before any window)."""
        trace, squared, weight = self.sums(terms)
        if weight == 0:
            return math.nan, math.nan
        return trace / weight, squared / weight

    def estimate(self, terms: Sequence[tuple[float, float]]) -> float:
        """``B_simple`` from the averaged terms (NaN before any window)."""
        trace, squared, weight = self.sums(terms)
        return math.nan if math.isnan(trace) else averaged_noise_scale(trace, squared, weight)
