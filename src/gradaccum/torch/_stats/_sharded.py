"""Per-sample statistics of a model sharded by FSDP2 (``fully_shard``): the norm path on shards.

Each rank's hooks see its own samples in full (the layer's input and output gradient), while
the gradient autograd leaves is a shard (rows ``[offset, offset + rows)`` of dim 0) of the sum
over every rank's samples, reduce-scattered by FSDP. So:

- the explained-gradient check (``_explained``) compares the hooked per-sample sums, summed
  over ranks, with the summed gradient, on this rank's rows: the hooked projections, their
  rounding bounds and term counts are all-reduced (one collective of a few numbers per row
  and parameter), each rank checks its rows, and the verdict is agreed;
- the norm path's ``sum_i |g_i|^2`` and sample count are summed over ranks and ``|S1|^2`` is
  the sum of the ranks' local shards' squared norms: the window's terms over every rank's
  samples, as one process over their union would have them (one all-reduce of ``2 P + 1``
  float64 scalars, ``P`` the parameters).

Per-element moments on shards, and the fallbacks that replay a layer or the model per sample
(they would run FSDP's collectives on one rank), are refused by name.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_sharded(params: list[torch.nn.Parameter]) -> bool:
    """Whether the parameters are DTensors (a ``fully_shard``-ed model's)."""
    return any(hasattr(p, "placements") for p in params)


def shard_group(params: list[torch.nn.Parameter], names: list[str]) -> dist.ProcessGroup:
    """The process group the parameters are sharded over; refuses what is not FSDP2's
    one-dimensional sharding on dim 0 of every parameter."""
    for p, name in zip(params, names):
        placements = getattr(p, "placements", None)
        if placements is None:
            raise ValueError(f"{name}: some parameters are sharded (fully_shard) and this one is not; per-sample "
                             "statistics need the whole model sharded the same way")
        if len(placements) != 1 or not placements[0].is_shard(0):
            raise ValueError(f"{name}: sharded as {placements}; per-sample statistics support fully_shard's "
                             "one-dimensional sharding on dim 0 only")
    return cast("DTensor", params[0]).device_mesh.get_group()


def local_rows(p: torch.nn.Parameter, projected: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``projected``, the projection (along the last dimension) of a tensor
    of ``p``'s full shape: the rows of ``p``'s local shard."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = cast("DTensor", p)  # fully_shard's parameters are DTensors
    shape, offset = compute_local_shape_and_global_offset(p.shape, sharded.device_mesh, sharded.placements)
    per_row = 1 if p.dim() < 2 else math.prod(p.shape[1:-1])
    return projected[offset[0] * per_row:(offset[0] + shape[0]) * per_row]


def agreed(wrong: list[int], size: int, group: dist.ProcessGroup) -> list[int]:
    """The positions any rank found wrong (every rank gets the same answer)."""
    mask = torch.zeros(size, dtype=torch.float64)
    mask[wrong] = 1.0
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
    return [j for j in range(size) if mask[j] > 0]
