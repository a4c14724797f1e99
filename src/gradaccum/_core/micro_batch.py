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
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .noise_scale import NormSums


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

    def __add__(self, other: tuple) -> MicroBatchSums:  # type: ignore[override]
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
