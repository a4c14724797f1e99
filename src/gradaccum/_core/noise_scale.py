"""The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

From a window of n per-sample gradients with mean ``mu`` and per-element M2
(docs/design.md, "Noise scale"):

    tr(Sigma) ~ sum_j M2_j / (n - 1)          unbiased
    |G|^2     ~ |mu|^2 - tr(Sigma) / n         unbiased (can be <= 0 for one window)

One window's estimate is noisy, and its ``|G|^2`` can be negative: numerator and
denominator are averaged separately (an exponential moving average) before dividing, as the
anchors do, and a non-positive averaged ``|G|^2`` gives an infinite noise scale (all noise,
no signal), never a division by it. Array-API code: the backends run it as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from array_api_compat import array_namespace

from .validation import check_positive_float


class NoiseTerms(NamedTuple):
    """Unbiased estimates of ``tr(Sigma)`` and ``|G|^2`` from one window."""

    trace: Any
    squared_norm: Any


def noise_terms(n: Any, means: Sequence[Any], m2s: Sequence[Any]) -> NoiseTerms:
    """``tr(Sigma)`` and ``|G|^2`` from a window's moments (n >= 2 samples)."""
    xp = array_namespace(means[0])
    nf = n if isinstance(n, int) else xp.astype(n, means[0].dtype)
    trace = sum(xp.sum(m2) for m2 in m2s) / (nf - 1)
    mean_sq = sum(xp.sum(m * m) for m in means)
    return NoiseTerms(trace, mean_sq - trace / nf)


def noise_scale(trace: float, squared_norm: float) -> float:
    """``tr(Sigma) / |G|^2``; infinite when ``|G|^2 <= 0`` (no measurable signal)."""
    return trace / squared_norm if squared_norm > 0 else math.inf


@dataclass(frozen=True)
class NoiseScaleEMA:
    """Exponential moving averages of ``tr(Sigma)`` and ``|G|^2`` over windows, then their ratio.

    ``decay`` is the weight of the past (0.9: about the last 10 windows count). The first
    window initialises both averages (a bias-corrected EMA, as Adam corrects its moments).
    """

    decay: float = 0.9

    def __post_init__(self) -> None:
        check_positive_float("decay", self.decay)
        if self.decay >= 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")

    def average(self, terms: Sequence[tuple[float, float]]) -> tuple[float, float]:
        """The bias-corrected EMAs of (trace, squared_norm) over ``terms``, oldest first."""
        trace = squared = weight = 0.0
        for t, g in terms:
            trace = self.decay * trace + (1 - self.decay) * t
            squared = self.decay * squared + (1 - self.decay) * g
            weight = self.decay * weight + (1 - self.decay)
        if weight == 0:
            return math.nan, math.nan
        return trace / weight, squared / weight

    def estimate(self, terms: Sequence[tuple[float, float]]) -> float:
        """``B_simple`` from the averaged terms (NaN before any window)."""
        trace, squared = self.average(terms)
        return math.nan if math.isnan(trace) else noise_scale(trace, squared)
