"""The per-element commit in blocks (docs/design.md, "Moments in blocks").

An increment's sums of squares ``S2`` are as large as the model: made whole, they are a third
parameter-sized buffer next to the running mean and ``M2`` (19 MiB on the 1.6M-parameter MLP).
Here the parameters are cut into blocks of at most ``BLOCK`` elements (rows of a large
parameter, or several small parameters together), and each block's ``S2`` is made (a layer's
``RowSquares`` writes its rows), guarded (``_guard``), unscaled and merged (``_merge``) before the
next block is made, through one buffer of ``BLOCK`` elements kept between increments. So the
statistics hold the mean, ``M2`` and that buffer, and no fresh memory is taken per increment;
the merge reads what the guard wrote while it is still in cache.

A data-parallel increment is reduced whole (its sums and ``M2`` are all-reduced once, not once
per block), so it is one block in a fresh buffer, as before the blocks.

Only the first block can fail before anything is merged. An exception in a later one (a
registered layer's ``values`` or ``RowSquares`` raising, memory running out) leaves the moments
partly merged: ``PartialCommit`` says so, and the collector refuses them until ``reset``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..._core.moments import Moments
from ._fused import Kernels, run_largest
from ._guard import Values, increment_m2
from ._merge import merge_into
from ._reductions import Reductions
from ._registry import RowSquares
from ._scratch import Scratch

# elements per block (2 MiB in float32): a block of a 4096-wide weight is 128 rows, as fast a GEMM as the whole
BLOCK = 1 << 19


class Piece(NamedTuple):
    """Rows ``start:stop`` (along dim 0) of parameter ``param``; a 0-d parameter is one row."""

    param: int
    start: int
    stop: int


class PartialCommit(RuntimeError):
    """A commit failed after merging some of its blocks: the running moments are partly merged."""


@functools.lru_cache(maxsize=16)
def plan_blocks(shapes: tuple[torch.Size, ...], block: float) -> list[list[Piece]]:
    """The parameters cut into blocks of at most ``block`` elements: a parameter that fits is
    whole and shares its block with its neighbours; a larger one is cut into blocks of rows (a
    block holds at least one row). Cached: a model's shapes do not change between increments."""
    blocks: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        rows = shape[0] if len(shape) else 1
        if numel <= block:
            if current and size + numel > block:
                blocks.append(current)
                current, size = [], 0
            current.append(Piece(i, 0, rows))
            size += numel
            continue
        step = max(1, int(block // (numel // rows)))
        blocks += [[Piece(i, start, min(rows, start + step))] for start in range(0, rows, step)]
    if current:
        blocks.append(current)
    return blocks


def rows(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's rows of ``t`` (a view; ``t`` itself where the piece is all of it)."""
    if t.dim() == 0 or (piece.start == 0 and piece.stop == t.shape[0]):
        return t
    return t[piece.start:piece.stop]


def _buffer(size: int, dtype: torch.dtype, device: torch.device, scratch: Scratch) -> torch.Tensor:
    """``size`` elements: of the statistic's ``"blocks"`` buffer, kept between increments (grown
    to the largest block asked for, at most ``BLOCK``), or fresh above ``BLOCK``."""
    if size > BLOCK:
        return torch.empty(size, dtype=dtype, device=device)
    return scratch.take("blocks", size, dtype, device)


def _seconds(block: list[Piece], params: Sequence[torch.Tensor], squares: list[torch.Tensor | RowSquares | None],
             into: list[torch.Tensor] | None, scratch: Scratch) -> list[torch.Tensor]:
    """The block's ``S2``, which the guard overwrites: in ``into`` where given (a new window's
    ``M2`` rows); else rows of the tensors at hand (the increment's own, no copy), or made into
    the buffer. Zeros where the parameter had no gradient."""
    copy_tensors = into is not None  # else a tensor's target is its own rows
    if into is None:
        into = _targets(block, params, squares, scratch)
    for q, out in zip(block, into):
        source = squares[q.param]
        if source is None:
            out.zero_()
        elif isinstance(source, RowSquares):
            source.write(q.start, q.stop, out)
        elif copy_tensors:
            out.copy_(rows(source, q))
    return into


def _targets(block: list[Piece], params: Sequence[torch.Tensor], squares: list[torch.Tensor | RowSquares | None],
             scratch: Scratch) -> list[torch.Tensor]:
    """Where each piece's ``S2`` goes: the rows of a tensor at hand, else consecutive views of
    the buffer (one per dtype and device)."""
    shapes = [(q.stop - q.start, *params[q.param].shape[1:]) if params[q.param].dim() else () for q in block]
    keys = [(params[q.param].dtype, params[q.param].device) for q in block]
    made = [not isinstance(squares[q.param], torch.Tensor) for q in block]
    sizes = {key: sum(math.prod(shape) for shape, k, m in zip(shapes, keys, made) if m and k == key)
             for key in set(keys)}
    buffers = {key: _buffer(size, *key, scratch) for key, size in sizes.items() if size}
    offsets = dict.fromkeys(buffers, 0)
    out: list[torch.Tensor] = []
    for q, shape, key in zip(block, shapes, keys):
        square = squares[q.param]
        if isinstance(square, torch.Tensor):  # not made: the rows of the tensor at hand
            out.append(rows(square, q))
            continue
        size = math.prod(shape)
        out.append(buffers[key][offsets[key]:offsets[key] + size].view(shape))
        offsets[key] += size
    return out


def _values_at(source: Values | None, piece: Piece, width: int) -> Values | None:
    """Per-sample values of a piece, its flat indices shifted to the parameter's."""
    if source is None or piece.start == 0:
        return source
    offset = piece.start * width
    return lambda index: source(index + offset)


def commit_in_blocks(state: list[Moments] | None, params: Sequence[torch.Tensor], firsts: list[torch.Tensor],
                     squares: list[torch.Tensor | RowSquares | None], n: int, coefficients: list[float],
                     values: list[Values | None], names: list[str], unscale: float,
                     reduce: Callable[[list[torch.Tensor], list[torch.Tensor], int], tuple[list[torch.Tensor], int]]
                     | None, reductions: Reductions, scratch: Scratch) -> list[Moments]:
    """Merge the increment (sums ``firsts``, sums of squares ``squares`` over its ``n`` samples,
    both scaled by ``unscale``) into ``state`` (None: a new window), block by block; returns the
    merged moments (``state``'s buffers, updated in place). ``reduce(firsts, m2s, n)`` makes a
    data-parallel increment global (then everything is one block). Tensors in ``squares`` are
    overwritten.

    Where the fused kernels run (``reductions.kernels``), each block's ``max(mu^2 + M2 / n)`` is
    taken as it is merged (in cache) and their maximum remembered by ``reductions`` for the
    decision, which then makes one pass over the moments instead of two. ``scratch``: the
    statistic's buffers (the blocks' sums of squares, the guard's chunks), kept between increments.

    Raises what the first block raises with nothing changed, and ``PartialCommit`` when a later
    block fails.
    """
    elements = sum(p.numel() for p in params)
    kernels: Kernels = reductions.kernels
    squares = [s.to(p.dtype) if isinstance(s, torch.Tensor) else s for p, s in zip(params, squares)]
    new = state is None  # a new window's moments are the increment's own: made in place, nothing to merge
    if state is None:
        state = [Moments(0, torch.empty_like(p), torch.empty_like(p)) for p in params]
    n_a, total = state[0].n, n
    largest: list[torch.Tensor | None] = []  # each block's max(mu^2 + M2 / n), where the fused kernels ran
    for number, block in enumerate(plan_blocks(tuple(p.shape for p in params), BLOCK if reduce is None else math.inf)):
        try:
            s1 = [rows(firsts[q.param], q) for q in block]
            means, m2s = [rows(state[q.param].mean, q) for q in block], [rows(state[q.param].m2, q) for q in block]
            m2 = increment_m2(s1, _seconds(block, params, squares, m2s if new else None, scratch), n,
                              [coefficients[q.param] for q in block],
                              [_values_at(values[q.param], q, math.prod(params[q.param].shape[1:])) for q in block],
                              [names[q.param] for q in block], elements, kernels, scratch)
            if unscale != 1.0:
                s1 = list(torch._foreach_div(s1, unscale))
                torch._foreach_div_(m2, unscale * unscale)
            if reduce is not None:
                s1, total = reduce(s1, m2, n)
            if new:  # mean = S1 / n; M2 = M2_b, which the guard wrote in place
                torch._foreach_copy_(means, s1)
                torch._foreach_div_(means, float(total))
                fused = kernels.for_operands(means, m2s, elements=elements)
                largest.append(None if fused is None else run_largest(fused, means, m2s, total))  # in cache
            else:
                largest.append(merge_into([Moments(n_a, mean, m2_a) for mean, m2_a in zip(means, m2s)], s1, m2, total,
                                          elements, kernels)[1])
        except Exception as error:
            if number == 0:
                raise
            raise PartialCommit(f"the statistics' commit failed after merging {number} of its blocks "
                                f"({type(error).__name__}: {error}): the running moments are partly merged "
                                "and lost; reset() starts a new window") from error
    merged = [Moments(n_a + total, m.mean, m.m2) for m in state]
    found = [x for x in largest if x is not None]
    if largest and len(found) == len(largest):
        reductions.remember_largest(merged, torch.stack(found).max())
    return merged
