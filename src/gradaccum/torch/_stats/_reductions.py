"""The mean GSNR over torch tensors in few passes: a fused implementation of the core's
definition (``gradaccum._core.statistics.gsnr_of``), which the per-element statistics hand to
the core with their moments (``ElementStatistics``).

The definition, written once against the array API, makes about fifteen passes over every
parameter element per decision, each into a fresh temporary; on a 21M-parameter MLP that was
330 ms per decision (a fresh 84 MB temporary costs page faults every time). Here the same
arithmetic (the same floor, the same live mask, NaN for non-finite moments) runs in two fused
passes where ``_fused`` runs (one, the ratios, where the merge that made the moments took the
floor's maximum: ``Reductions.remember_largest``), else in place on scratch buffers kept between
decisions, about seven passes and no allocation; a large model in
pieces of ``CHUNK`` elements, so the scratch is two buffers of that size, not of the model's
(on the 1.6M-parameter MLP the model-sized scratch had been 14 MB of the statistics' peak). A parity test
(tests/test_formulas_parity.py) holds the two equal on every edge case.

What a decision keeps for the next (the scratch buffers, the merge's maximum) belongs to the
``Reductions`` object of one statistics' moments.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..._core import statistics
from ._fused import Kernels, run_largest, run_ratios

CHUNK = 1 << 18  # elements per pass over a large model: the scratch is two buffers of this size


class Reductions:
    """``gsnr_of`` on one statistics' moments, with what it keeps between decisions.

    Args:
      kernels: the fused kernels of those statistics (they run where they pay).
    """

    def __init__(self, kernels: Kernels) -> None:
        self.kernels = kernels
        self._scratch: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._recalled: tuple[float, list[tuple[Any, int, Any, int]], torch.Tensor] | None = None

    @torch.no_grad()
    def gsnr_of(self, means: Sequence[torch.Tensor], m2s: Sequence[torch.Tensor], n: Any, scale: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The core's ``statistics.gsnr_of``, the same arithmetic in few passes."""
        means, m2s = list(means), list(m2s)
        size = sum(m.numel() for m in means)
        dtype, device = means[0].dtype, means[0].device
        nf = float(n)
        kernels = self.kernels.for_operands(means, m2s)
        passes = _Foreach(means, m2s, self._buffers) if kernels is None else _Fused(kernels, means, m2s)
        largest_value = self.recall(means, m2s, nf)  # taken by the merge that made these moments, if it was
        if largest_value is None:
            # E[g^2] = mu^2 + M2 / n, for the floor; NaN or inf iff a moment is not finite
            largest_value = passes.largest(nf)
        if not bool(torch.isfinite(largest_value)):
            nan = torch.full((), math.nan, dtype=dtype, device=device)
            return nan, torch.zeros((), dtype=torch.int64), torch.full((), size, dtype=torch.int64)
        floor = statistics.variance_floor(means[0], largest_value)
        threshold = float(floor) * max(nf - 1.0, 1.0)  # var > floor  <=>  M2 > floor * (n - 1)
        total, count = passes.ratios(threshold)  # sum of mu^2 / M2 over the live elements, and their count
        total = total * max(nf - 1.0, 1.0)  # mu^2 / var = (n - 1) mu^2 / M2
        return statistics.gsnr_value(total, count, n, scale), count, size - count

    def remember_largest(self, moments: Sequence[Any], value: torch.Tensor) -> None:
        """``max(mu^2 + M2 / n)`` of ``moments`` as the merge that made them took it (``_blocks``):
        the next decision on them reads it instead of making its own pass. It holds while every
        buffer is the same tensor at the same version (any in-place change, a new window, a loaded
        state: the decision takes its own pass again)."""
        self._recalled = (float(moments[0].n), [(weakref.ref(m.mean), m.mean._version, weakref.ref(m.m2),
                                                 m.m2._version) for m in moments], value)

    def forget(self) -> None:
        """Forget the remembered maximum: the next decision takes its own pass."""
        self._recalled = None

    def recall(self, means: list[torch.Tensor], m2s: list[torch.Tensor], n: float) -> torch.Tensor | None:
        """The remembered maximum, if it is of these very buffers, unchanged, over ``n`` samples."""
        if self._recalled is None:
            return None
        count, buffers, value = self._recalled
        if count != n or len(buffers) != len(means):
            return None
        for (mean_ref, mean_version, m2_ref, m2_version), mean, m2 in zip(buffers, means, m2s):
            if (mean_ref() is not mean or mean._version != mean_version
                    or m2_ref() is not m2 or m2._version != m2_version):
                return None
        return value

    def _buffers(self, key: tuple, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Scratch buffers kept between decisions (one set per shape, dtype and device)."""
        if key not in self._scratch:
            if len(self._scratch) > 8:  # a few shapes at a time; never grow without bound
                self._scratch.clear()
            self._scratch[key] = make()
        return self._scratch[key]


Buffers = Callable[[tuple, Callable[[], tuple[torch.Tensor, ...]]], tuple[torch.Tensor, ...]]


def _pieces(means: list[torch.Tensor], m2s: list[torch.Tensor],
            buffers: Buffers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The moments as pieces of at most CHUNK elements: views of large parameters (no copy),
    or one flat copy of a small model's (few kernel launches)."""
    size = sum(m.numel() for m in means)
    if len(means) > 1 and size <= statistics.FLAT_BELOW:
        flat_mean, flat_m2 = buffers(("flat", size, means[0].dtype, means[0].device),
                                     lambda: (torch.empty(size, dtype=means[0].dtype, device=means[0].device),
                                              torch.empty(size, dtype=means[0].dtype, device=means[0].device)))
        torch.cat([m.reshape(-1) for m in means], out=flat_mean)
        torch.cat([m.reshape(-1) for m in m2s], out=flat_m2)
        return [(flat_mean, flat_m2)]
    return [(a, b) for m, m2 in zip(means, m2s)
            for a, b in zip(m.reshape(-1).split(CHUNK), m2.reshape(-1).split(CHUNK))]


class _Fused:
    """The decision's two passes as fused kernels (``_fused``), one call per parameter."""

    def __init__(self, kernels: Kernels, means: list[torch.Tensor], m2s: list[torch.Tensor]) -> None:
        self.kernels, self.means, self.m2s = kernels, means, m2s

    def largest(self, n: float) -> torch.Tensor:
        return run_largest(self.kernels, self.means, self.m2s, n)

    def ratios(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        return run_ratios(self.kernels, self.means, self.m2s, threshold)


class _Foreach:
    """The decision's two passes op by op, in place on scratch buffers kept between decisions."""

    def __init__(self, means: list[torch.Tensor], m2s: list[torch.Tensor], buffers: Buffers) -> None:
        self.pieces = _pieces(means, m2s, buffers)
        width = max(a.numel() for a, _ in self.pieces)
        dtype, device = means[0].dtype, means[0].device
        self.work, self.live = buffers(("work", width, dtype, device), lambda: (
            torch.empty(width, dtype=dtype, device=device), torch.empty(width, dtype=dtype, device=device)))
        self.dtype, self.device = dtype, device

    def largest(self, n: float) -> torch.Tensor:
        largest = []
        for mean, m2 in self.pieces:
            w = self.work[:mean.numel()]
            torch.mul(m2, 1.0 / n, out=w).addcmul_(mean, mean)
            largest.append(w.max())
        return torch.stack(largest).max()

    def ratios(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)  # sums of 0s and 1s: exact
        for mean, m2 in self.pieces:
            k = mean.numel()
            w, live = self.work[:k], self.live[:k]
            torch.gt(m2, threshold, out=live)  # 1 or 0 in the moments' dtype (a bool mask is 3x slower to make)
            torch.clamp_min(m2, threshold, out=w)
            torch.div(mean, w, out=w).mul_(live)  # mu / M2 on the live elements, 0 elsewhere
            total += torch.dot(mean, w)
            count += live.sum(dtype=torch.float64)
        return total, count.to(torch.int64)

