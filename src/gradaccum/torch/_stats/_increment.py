"""What one increment's backward produced, per parameter: the record the layer paths fill
(``_paths``), the check reads (``_check``) and a statistic merges (``_norms``, ``_elements``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._explained import Projector, scale_from_squares
from ._guard import Values
from ._registry import LayerStats, RowSquares, channels_last_positions


@dataclass
class Increment:
    """Per parameter (order of ``params``), what the hooked calls of one increment gave."""

    lengths: list[int]  # each parameter's last-dim length (what the projection runs along; 1 for vectors)
    # per-element sums of squares over samples
    squares: list[torch.Tensor | RowSquares | None] = field(default_factory=list)
    hooked: list[torch.Tensor | None] = field(default_factory=list)  # projected sums of the hooked per-sample gradients
    floor: list[Any] = field(default_factory=list)  # the layer's per-element magnitude floor (see _explained)
    norms: list[torch.Tensor | None] = field(default_factory=list)  # norm-path entries: sum_i |g_i|^2 (0-d)
    scales: list[torch.Tensor | None] = field(default_factory=list)  # their projected magnitudes
    terms: list[int | None] = field(default_factory=list)  # their summed terms per element (default: samples)
    tied: dict[int, torch.Tensor] = field(default_factory=dict)  # per-sample gradients summed over calls
    values: list[Values | None] = field(default_factory=list)  # per-sample values at given elements (the guard)

    def __post_init__(self) -> None:
        size = len(self.lengths)
        self.squares, self.hooked, self.norms, self.scales, self.values = (  # type: ignore[assignment]
            [None] * size for _ in range(5))
        self.floor, self.terms = [0.0] * size, [None] * size

    def dense_squares(self, i: int) -> torch.Tensor | None:
        """Parameter i's sums of squares as a tensor (a ``RowSquares`` is made whole, once)."""
        if isinstance(self.squares[i], RowSquares):
            self.squares[i] = self.squares[i].full()  # type: ignore[union-attr]
        return self.squares[i]  # type: ignore[return-value]

    def scale(self, i: int, n: int, project: Projector) -> torch.Tensor | None:
        """Parameter i's projected magnitude bound (before the floor)."""
        if self.scales[i] is not None:
            return self.scales[i]
        squares = self.dense_squares(i)
        return None if squares is None else scale_from_squares(squares, n, project)

    def has_bound(self, i: int) -> bool:
        if self.scales[i] is not None:
            return self.scales[i].numel() > 0  # type: ignore[union-attr]
        return self.squares[i] is not None and math.prod(self.squares[i].shape) > 0  # type: ignore[union-attr]

    def bound_source(self, i: int) -> torch.Tensor:
        """The tensor whose maximum gives parameter i's per-element bound (``element_bound``):
        the layer's magnitudes where it gave them (small), else the sums of squares."""
        return self.scales[i] if self.scales[i] is not None else self.dense_squares(i)  # type: ignore[return-value]

    def element_bound(self, i: int, largest: float, n: int, project: Projector) -> float:
        """The largest per-element magnitude bound of parameter i from ``largest``, the maximum
        of its ``bound_source``: the largest projected row over ``sum|v|``, or ``sqrt(n max S2)``."""
        if self.scales[i] is not None:
            return largest / project.abs_sum(self.lengths[i])
        return math.sqrt(max(largest, 0.0) * n)

    def squared_norm(self, i: int) -> torch.Tensor | None:
        """``sum_i |g_i|^2`` of parameter i over the increment's samples."""
        if self.norms[i] is not None:
            return self.norms[i]
        squares = self.dense_squares(i)
        return None if squares is None else squares.sum()

    def add_squares(self, i: int, per_sample: torch.Tensor, project: Projector) -> None:
        """Add per-sample gradients of parameter i (samples on dim 0): their squares and projected sum."""
        self.squares[i] = plus(self.squares[i], sum_of_squares(per_sample))
        self.hooked[i] = plus(self.hooked[i], project(per_sample.sum(0)))

    def add_tied(self, i: int, per_sample: torch.Tensor, offset: int, batch: int) -> None:
        """Add the per-sample gradients of samples ``offset:offset + len(per_sample)`` of one call
        of parameter i (out of ``batch``) to their sum over the calls that use it, in a buffer of
        the increment's own (a layer's result is read, never written; holding it instead would
        keep one more parameter-sized batch alive while the next call's is added)."""
        if i not in self.tied:
            self.tied[i] = torch.zeros(batch, *per_sample.shape[1:], dtype=per_sample.dtype, device=per_sample.device)
        self.tied[i][offset:offset + len(per_sample)] += per_sample

    def add_terms(self, i: int, terms: int) -> None:
        """Autograd adds ``terms`` more terms into each element of parameter i."""
        self.terms[i] = (self.terms[i] or 0) + terms


SQUARES_CHUNK = 1 << 16  # elements squared at a time by ``sum_of_squares`` on the CPU (256 KiB in float32)


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """``(t * t).sum(0)``. On the CPU a few rows at a time are squared into one small buffer and
    added up, so that no temporary the size of ``t`` is made: a fresh buffer of a few MiB costs
    its page faults on every increment (a 2 MiB square measured 1.2 ms inside a GPT's commit
    against 0.2 ms warm), more than the arithmetic. The sum's order of additions differs (rows
    in chunks): rounding only. Half-precision tensors are summed whole (``sum`` accumulates them
    in float32 and rounds once; partial sums in their own dtype would round at every chunk)."""
    rows = t.shape[0] if t.dim() else 0
    width = t.numel() // rows if rows else 0
    step = max(1, SQUARES_CHUNK // max(1, width))
    if t.device.type != "cpu" or step >= rows or not t.is_contiguous() or t.dtype not in (torch.float32,
                                                                                           torch.float64):
        return (t * t).sum(0)
    flat = t.view(rows, width)
    buffer = torch.empty(step, width, dtype=t.dtype, device=t.device)
    total = torch.sum(torch.mul(flat[:step], flat[:step], out=buffer), 0)
    partial = torch.empty_like(total)
    for start in range(step, rows, step):
        part = flat[start:start + step]
        squares = torch.mul(part, part, out=buffer[:len(part)])
        total.add_(torch.sum(squares, 0, out=partial))
    return total.view(t.shape[1:])


def plus(a: Any, b: Any) -> Any:
    """``a + b``, ``b`` where ``a`` is None (a ``RowSquares`` made whole to be added)."""
    if a is None:
        return b
    return (a.full() if isinstance(a, RowSquares) else a) + (b.full() if isinstance(b, RowSquares) else b)


def gather(per_sample: torch.Tensor) -> Values:
    """Per-sample values at flat element indices from per-sample gradients at hand
    (``index_select``: advanced indexing of dim 1 is several times slower)."""
    return lambda index: per_sample.reshape(len(per_sample), -1).index_select(1, index)


def positions(entry: LayerStats | None, d: torch.Tensor | None) -> int:
    """Positions per sample a layer's gradient sums over (see ``LayerStats.positions``)."""
    if d is None:
        return 1
    return max(1, (entry.positions if entry is not None and entry.positions else channels_last_positions)(d))
