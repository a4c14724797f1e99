"""The micro-batch Monitor's open window: what each backward of a plain accumulation loop added,
and the window's noise terms from it at the step."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._core.micro_batch import MicroBatchSums
from .._core.noise_scale import NormSums, layer_noise_scales, pooled_terms


class MicroBatchWindow:
    """The micro-batch source's open window: per backward its samples and, per parameter, the
    squared norm of the gradient it added and that gradient's product with ``.grad`` before it
    (the earlier backwards' sum), the scale divided out; what ``.grad`` should hold now. The
    backwards' values stay on the device until ``read`` takes the window's in one
    synchronisation, at the step.

    Args:
      names: each parameter's name (its layer is the name's prefix).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.layers = [name.rpartition(".")[0] or name for name in names]
        self.measured = False  # a window of >= 2 micro-batches was recorded
        self.reset()

    def reset(self) -> None:
        """An empty window: after a step, or when the gradients were cleared without one."""
        self.samples: list[int] = []
        self.squares: list[dict[int, float]] = []
        self.dots: list[dict[int, float]] = []
        self.params: set[int] = set()
        self.expected: list[tuple[Any, int] | None] = [None] * len(self.names)
        self.overflow = False  # a micro-batch overflowed under an enabled GradScaler: its step is skipped
        self.nonfinite = False
        self.refused = 0  # backwards refused since the window opened (not measured, not in the window)
        # per backward not yet read: the parameters reached, those with a product, their values, the scale
        self._unread: list[tuple[list[int], list[int], torch.Tensor | None, float]] = []

    def add(self, samples: int, reached: list[int], dotted: list[int], values: torch.Tensor | None, scale: float,
            after: dict[int, tuple[Any, int]]) -> None:
        """One backward: the squares of the parameters ``reached`` then the products of those
        ``dotted``, in ``values`` (float64, on the device), under the loss scale ``scale``."""
        self.samples.append(samples)
        self._unread.append((reached, dotted, values, scale))
        self.params.update(reached)
        for i, state in after.items():
            self.expected[i] = state

    def read(self, overflow_skips: bool) -> None:
        """The backwards' squares and products as Python floats, the scale divided out, in one
        synchronisation. A non-finite value marks the window: ``overflow`` where an enabled
        GradScaler skips its step (``overflow_skips``), else ``nonfinite`` (NaN terms)."""
        unread, self._unread = self._unread, []
        tensors = [values for _, _, values, _ in unread if values is not None]
        floats = torch.cat([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else []
        position = 0
        for reached, dotted, _, scale in unread:
            values = floats[position:position + len(reached) + len(dotted)]
            position += len(values)
            if not all(math.isfinite(v) for v in values):
                self.overflow = self.overflow or overflow_skips
                self.nonfinite = self.nonfinite or not overflow_skips
            factor = 1.0 / (scale * scale)
            self.squares.append({i: v * factor for i, v in zip(reached, values)})
            self.dots.append({i: v * factor for i, v in zip(dotted, values[len(reached):])})

    def row(self, accumulation: str | int, reduction: str) -> tuple[float, float, float, dict[str, float]]:
        """(samples, tr(Sigma), |G|^2, the per-layer noise scales) of the window."""
        groups: dict[str, list[int]] = {}
        for i in sorted(self.params):
            groups.setdefault(self.layers[i], []).append(i)
        n = float(sum(self.samples))
        if self.nonfinite:
            return n, math.nan, math.nan, {f"noise_scale/{name}": math.nan for name in groups}
        everything = sorted(self.params)
        pooled = pooled_terms(self._norm_sums(everything, accumulation, reduction))
        layers = {name: self._norm_sums(indices, accumulation, reduction) for name, indices in groups.items()}
        extra = {f"noise_scale/{name}": math.nan for name in groups}
        extra.update(layer_noise_scales(layers))
        return n, pooled.trace, pooled.squared_norm, extra

    def _norm_sums(self, indices: list[int], accumulation: str | int, reduction: str) -> NormSums:
        k = len(self.samples)
        divisor = k if accumulation == "mean" else 1 if accumulation == "sum" else int(accumulation)
        units = float(divisor * divisor)  # each backward's loss was its micro-batch's over the divisor
        squares = [math.fsum(s.get(i, 0.0) for i in indices) * units for s in self.squares]
        dots = [math.fsum(d.get(i, 0.0) for i in indices) * units for d in self.dots]
        weights = self.samples if reduction == "mean" else [1] * k
        return micro_batch_norm_sums(self.samples, weights, squares, dots)


def micro_batch_norm_sums(samples: list[int], weights: list[int], squares: list[float],
                          dots: list[float]) -> NormSums:
    """The norm sums of a window of micro-batches from what an accumulation loop's hooks see.

    Micro-batch ``j`` (``b_j`` samples) added ``u_j`` to ``.grad``, its gradient sum
    ``S_j = w_j u_j`` (``w_j = b_j`` for a mean loss, 1 for a summed one); ``squares[j] = |u_j|^2``
    and ``dots[j] = u_j . (u_1 + ... + u_{j-1})``. With equal weights ``|S|^2 = w^2 (sum_j |u_j|^2
    + 2 sum_j dots[j])`` and these are the micro-batch estimator's sums (``MicroBatchSums``). A mean
    loss over micro-batches of unequal sizes leaves the weighted cross products out of reach
    without a parameter-sized buffer: the means' pairwise products then give
    ``|G|^2 = sum_{j<l} g_j . g_l / C(k, 2)`` and ``tr(Sigma) = (sum_j |g_j|^2 - k |G|^2) /
    sum_j 1 / b_j`` (``g_j = u_j``), also unbiased with ``k - 1`` degrees of freedom, the same
    numbers when the sizes agree (docs/design.md, "Micro-batch statistics")."""
    k, n = len(samples), sum(samples)
    if k == 0:
        return NormSums(0.0, 0.0, 0.0, 0.0, 0.0)
    if k == 1 or len(set(weights)) == 1:
        w = float(weights[0])
        weighted = math.fsum(w * w * u / b for u, b in zip(squares, samples))
        squared_sum = w * w * (math.fsum(squares) + 2.0 * math.fsum(dots))
        return MicroBatchSums(k, n, weighted).norm_sums(max(squared_sum, 0.0))
    signal = 2.0 * math.fsum(dots) / (k * (k - 1))
    trace = max((math.fsum(squares) - k * signal) / math.fsum(1.0 / b for b in samples), 0.0)
    return NormSums(float(n), trace * (k - 1), float(k - 1), n * signal + trace, 1.0)
