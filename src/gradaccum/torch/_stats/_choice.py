"""Which path a layer's call takes to its per-element sums of squares ``S2 = sum_i g_i^2``:
the layer's closed form or its per-sample gradients made whole (docs/noise-scale.md, "Per-sample
statistics: how each layer is measured").

For ``nn.Linear`` on ``T`` positions per sample, ``g_i = D_i^T X_i`` and both paths make the same
products, ``2 B T d_in d_out`` flops, and square and sum them (``B d_in d_out``). They differ in
what they move and hold:

- the closed form (``linear:sum_squares``) makes ``S2`` a block of rows at a time while the
  moments merge it (``_blocks``): the products of a block's rows for a few samples at a time, at
  most ``PRODUCTS`` elements, squared in place and summed while they are in cache. ``S2`` is never
  whole and no per-sample gradient is held past its block. Each block of rows reads every
  sample's ``X`` again, and each sample chunk is one more small GEMM. At one position per sample
  it is ``(D^2)^T X^2``: one GEMM of ``B d_in d_out`` and no per-sample products at all.
- per-sample gradients (``linear:per_sample``) are made for the whole batch in one batched GEMM
  (``B d_in d_out`` elements written, then squared and summed: three passes over memory) and
  ``S2`` is held whole until the commit.

``linear_costs`` puts both in flops, an element moved costing ``BALANCE`` flops (a machine's
flops per element of memory bandwidth, CPU and GPU alike within a factor of two) and a kernel
launch ``LAUNCH`` flops. The per-sample path is taken where it costs no more (a tie: the whole
batch's products fit in ``PRODUCTS`` elements, which the closed form would make at once too)
*and* the whole batch's per-sample gradients of the layer fit in ``BUDGET`` elements (one
layer's at a time, freed before the next layer's; ``chunk_elements`` then still cuts them into
chunks of samples); else the closed form stays. Both paths are exact: the choice changes
the order of float additions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _blocks

BUDGET = 1 << 24  # elements of one layer's per-sample gradients the per-sample path may take (64 MiB in float32)
PRODUCTS = 1 << 19  # elements of the closed form's per-sample products made at once (2 MiB in float32)
BALANCE = 8.0  # flops that cost as much time as moving one element through memory
LAUNCH = 2e5  # flops that cost as much time as launching one small kernel (a few microseconds)


class Costs(NamedTuple):
    """Estimated cost (flops, memory traffic and launches in flops) of the two paths of one call,
    and the elements the per-sample gradients of the call take at once."""

    closed: float
    per_sample: float
    per_sample_elements: int


def row_blocks(n_out: int, n_in: int) -> tuple[int, int]:
    """The rows per block and the number of blocks of a ``(n_out, n_in)`` weight in ``_blocks``
    (a weight of at most ``_blocks.BLOCK`` elements is one block)."""
    block = int(_blocks.BLOCK)
    if n_out * n_in <= block:
        return n_out, 1
    rows = max(1, block // n_in)
    return rows, math.ceil(n_out / rows)


def samples_per_product(rows: int, n_in: int) -> int:
    """Samples whose products of ``rows`` rows the closed form makes at once (at most ``PRODUCTS``
    elements, at least one sample)."""
    return max(1, PRODUCTS // max(1, rows * n_in))


def linear_costs(b: int, t: int, n_in: int, n_out: int) -> Costs:
    """Both paths' costs for ``nn.Linear(n_in, n_out)`` on ``b`` samples of ``t`` positions.

    At one position the closed form is one GEMM of ``2 B d_in d_out`` flops against the per-sample
    products and their squares: it is cheaper. Over positions both make the same products and
    squares; the per-sample path moves its ``B d_in d_out`` buffer three times unless it fits in
    ``PRODUCTS`` elements (then the closed form makes the very same one batched GEMM: a tie, which
    goes to per-sample gradients), and the closed form reads ``X`` again for every block of rows
    after the first and launches a GEMM per block and sample chunk."""
    elements = b * n_in * n_out
    products = 2.0 * b * t * n_in * n_out + elements  # the per-sample products, squared and summed
    buffer = BALANCE * 3 * elements if elements > PRODUCTS else 0.0  # the per-sample buffer's passes
    if t <= 1:  # both read X and D once; (D^2)^T X^2 is one GEMM
        inputs = BALANCE * b * (n_in + n_out) + LAUNCH * 3
        return Costs(2.0 * elements + inputs, products + buffer + inputs, elements)
    rows, blocks = row_blocks(n_out, n_in)
    launches = blocks * math.ceil(b / samples_per_product(rows, n_in))
    closed = products + BALANCE * b * t * n_in * (blocks - 1) + LAUNCH * 3 * launches
    return Costs(closed, products + buffer + LAUNCH * 3, elements)


def _linear(args: tuple, d: torch.Tensor) -> Costs | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        return None
    b = x.shape[0]
    if x.shape[-1] == 0 or d.shape[-1] == 0:  # nothing to choose between: the closed form
        return None
    return linear_costs(b, x.numel() // (b * x.shape[-1]), x.shape[-1], d.shape[-1])


ESTIMATES: dict[str, Callable[[tuple, torch.Tensor], Costs | None]] = {"linear": _linear}
"""Per registered layer name, the cost of both paths of a call (``LayerStats.name``); a layer
without an estimate takes its closed form wherever it gives one."""


def per_sample_is_cheaper(name: str, args: tuple, d: torch.Tensor) -> bool:
    """Whether the call of the layer ``name`` (its positional inputs ``args`` and output gradient
    ``d``) takes per-sample gradients although it has a closed form: where they cost no more and
    fit in ``BUDGET`` elements."""
    estimate = ESTIMATES.get(name)
    costs = None if estimate is None else estimate(args, d)
    return costs is not None and costs.per_sample_elements <= BUDGET and costs.per_sample <= costs.closed
