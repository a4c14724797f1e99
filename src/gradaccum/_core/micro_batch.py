"""Noise terms from the micro-batches' own gradients: no per-sample gradients, no hooks.

A window of ``k`` micro-batches holds ``k`` independent estimates of the gradient: micro-batch
``j`` has ``b_j`` samples and gradient sum ``S_j`` (the gradient of its samples' summed loss),
so its mean ``g_j = S_j / b_j`` has covariance ``Sigma / b_j`` around the true gradient ``G``;
the window's mean ``g = S / n`` (``S = sum_j S_j``, ``n = sum_j b_j``) has ``Sigma / n``. Then

    E[sum_j b_j |g_j|^2] = n |G|^2 + k tr(Sigma),     E[n |g|^2] = n |G|^2 + tr(Sigma),

so ``sum_j |S_j|^2 / b_j - |S|^2 / n = sum_j b_j |g_j - g|^2`` (>= 0) estimates
``(k - 1) tr(Sigma)`` without bias, and ``|g|^2 - tr(Sigma) / n`` estimates ``|G|^2``
(McCandlish et al. 2018, appendix A, for unequal batch sizes; docs/design.md, "Micro-batch
statistics"). ``k - 1`` degrees of freedom, not ``n - 1``: a window of one micro-batch has no
variance to measure.

These are the norm path's ``NormSums`` with the micro-batches as the groups: the same
``pooled_terms`` makes the estimates, and under data parallelism every rank's micro-batches are
more groups (their sums add). Units: one sample's summed loss, as the per-sample path (a
language model's sample is a sequence; its gradient the gradient of the sequence's summed
token losses). Unbiased when the samples are independent and identically distributed; the
micro-batches may differ in size and in tokens.

Per element the same algebra gives the variance of the micro-batch means: with ``M2`` the
between-micro-batch sum ``sum_j b_j (g_j - g)^2`` of one element,
``E[M2] = (k - 1) sigma^2`` (its per-sample variance), so ``M2 / (k - 1)`` estimates
``sigma^2`` and ``M2 / ((k - 1) n)`` the variance of the window's mean. ``merge_micro_batch``
keeps ``M2`` with Chan's update against the window sum (one parameter-sized buffer, no
difference of two large sums), ``m2_from_squares`` makes it from ``sum_j |S_j|^2 / b_j`` per
element; ``element_moments`` hands it to the per-element rules as the ``Moments`` they read.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

from .moments import Moments, at_least_1
from .noise_scale import NoiseTerms, NormSums


class MicroBatchSums(NamedTuple):
    """A window's micro-batch statistics on one process, summable over processes.

    Attributes:
      micro_batches: k, the micro-batches measured (with samples).
      samples: n, their samples.
      weighted: ``sum_j |S_j|^2 / b_j``, each micro-batch's squared gradient sum over its samples.
    """

    micro_batches: int
    samples: int
    weighted: float

    def add(self, squared_sum: float, samples: int) -> MicroBatchSums:
        """With one more micro-batch of ``samples`` samples whose gradient sum has squared norm
        ``squared_sum``."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1 for a measured micro-batch, got {samples}")
        if not 0 <= squared_sum < math.inf:
            raise ValueError(f"the micro-batch's squared gradient norm must be finite and >= 0, got {squared_sum}")
        return MicroBatchSums(self.micro_batches + 1, self.samples + samples, self.weighted + squared_sum / samples)

    def __add__(self, other: tuple[Any, ...]) -> MicroBatchSums:
        return MicroBatchSums(*(a + b for a, b in zip(self, other)))

    def norm_sums(self, window_squared_sum: float) -> NormSums:
        """``NormSums`` with the micro-batches as groups, given ``|S|^2`` of the window's gradient
        sum over the same micro-batches: ``pooled_terms`` of it is the unbiased estimate.
        Rounding can leave ``sum_j |S_j|^2 / b_j - |S|^2 / n`` slightly below 0 when the
        micro-batches agree; it is clamped to 0."""
        n, k = self.samples, self.micro_batches
        if n == 0:
            return NormSums(0.0, 0.0, 0.0, 0.0, 0.0)
        squared = window_squared_sum / n
        return NormSums(float(n), max(self.weighted - squared, 0.0), float(k - 1), squared, 1.0)


EMPTY = MicroBatchSums(0, 0, 0.0)


def micro_batch_terms(micro_batches: Any, samples: Any, weighted: Any, window_squared: Any) -> NoiseTerms:
    """Unbiased ``tr(Sigma)`` and ``|G|^2`` of one process's window from its micro-batches:
    ``pooled_terms`` of ``MicroBatchSums(k, n, weighted).norm_sums(window_squared)``, as array
    code a traced step runs (Python numbers work too). ``weighted``: ``sum_j |S_j|^2 / b_j``;
    ``window_squared``: ``|S|^2``. Fewer than two measured micro-batches have no variance: both
    terms are NaN, so no rule passes on them and no planner averages them."""
    if isinstance(weighted, (int, float)):
        terms = MicroBatchSums(int(micro_batches), int(samples), float(weighted)).norm_sums(float(window_squared))
        trace = terms.m2 / terms.dof if terms.dof > 0 else math.nan
        return NoiseTerms(trace, (terms.squared - trace) / terms.samples if samples > 0 else math.nan)
    xp = array_namespace(weighted)
    n = xp.astype(at_least_1(samples), weighted.dtype)
    k = xp.astype(micro_batches, weighted.dtype)
    per_sample = window_squared / n  # |S|^2 / n
    m2 = xp.maximum(weighted - per_sample, xp.zeros_like(weighted))
    trace = m2 / xp.maximum(k - 1, xp.ones_like(k))
    trace = xp.where(micro_batches >= 2, trace, xp.asarray(math.nan, dtype=weighted.dtype))
    return NoiseTerms(trace, (per_sample - trace) / n)


# ------------------------------------------------------------------ per element


def merge_micro_batch(m2: Any, window_sum: Any, window_samples: Any, micro_sum: Any, samples: Any) -> Any:
    """The between-micro-batch ``M2`` per element after one more micro-batch (array API).

    ``window_sum`` and ``window_samples`` are the window's gradient sum and samples *before*
    this micro-batch, ``micro_sum`` and ``samples`` the micro-batch's (``b``). Chan's update with
    the micro-batch as one group of zero spread: ``M2 + (S_j / b - S / n_a)^2 b n_a / (n_a + b)``,
    never the difference of two large sums. A micro-batch of 0 samples, or the window's
    first, adds 0 (with finite sums). Counts may be Python ints or integer arrays."""
    xp = array_namespace(m2, micro_sum)
    n_a = _as(window_samples, m2)
    b = _as(samples, m2)
    delta = micro_sum / xp.maximum(b, xp.ones_like(b)) - window_sum / xp.maximum(n_a, xp.ones_like(n_a))
    weight = b * n_a / xp.maximum(n_a + b, xp.ones_like(b))
    return m2 + delta * delta * weight


def m2_from_squares(weighted_squares: Any, window_sum: Any, samples: Any) -> Any:
    """The between-micro-batch ``M2`` per element from ``sum_j S_j^2 / b_j`` (the squared
    micro-batch sums over their samples, elementwise) and the window sum ``S``:
    ``sum_j S_j^2 / b_j - S^2 / n = sum_j b_j (g_j - g)^2``, clamped at 0 (rounding). Loses
    digits where the micro-batches agree to many places; ``merge_micro_batch`` does not."""
    xp = array_namespace(weighted_squares, window_sum)
    n = _as(samples, window_sum)
    m2 = weighted_squares - window_sum * window_sum / xp.maximum(n, xp.ones_like(n))
    return xp.maximum(m2, xp.zeros_like(m2))


def element_moments(micro_batches: Any, samples: Any, window_sum: Any, m2: Any) -> Moments:
    """The ``Moments`` the per-element rules read (``GSNR``, ``noise_terms``), from the window
    sum and the between-micro-batch ``M2`` of ``k`` micro-batches holding ``n`` samples.

    The rules take ``m2 / (n - 1)`` as the per-sample variance; the micro-batches' estimate is
    ``M2 / (k - 1)``, so the moments carry ``M2 (n - 1) / (k - 1)`` (equal to the per-sample
    path's ``M2`` when every micro-batch is one sample). ``n`` stays the samples: the mean-scale
    GSNR is ``n mu^2 / var`` and the rules' bounds count samples. Fewer than two micro-batches
    have no variance: ``m2`` is NaN, so the GSNR is NaN and no rule passes on it."""
    xp = array_namespace(window_sum, m2)
    n = _as(samples, m2)
    k = _as(micro_batches, m2)
    one = xp.ones_like(k)
    factor = (xp.maximum(n, one) - 1) / xp.maximum(k - 1, one)
    nan = xp.asarray(math.nan, dtype=m2.dtype, device=device(m2))
    scaled = xp.where(k >= 2, m2 * factor, nan)
    return Moments(samples, window_sum / xp.maximum(n, one), scaled)


def _as(count: Any, like: Any) -> Any:
    """A count (Python number or array) as a 0-d array of ``like``'s dtype."""
    xp = array_namespace(like)
    if isinstance(count, (int, float)):
        return xp.asarray(count, dtype=like.dtype, device=device(like))
    return xp.astype(count, like.dtype)
