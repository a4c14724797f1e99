"""Gradient synchronisation under DistributedDataParallel, once per window.

The Accumulator switches off DDP's own per-backward all-reduce and reduces the
window's *summed* gradients and item counts itself when the window closes. That is
one reduction per window however the window ends (a fixed k, an adaptive rule that
decides after the backward, or a flush), and it weights ranks by their item counts
instead of DDP's plain average over ranks, which is wrong when ranks see different
numbers of tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def is_ddp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is wrapped in DistributedDataParallel."""
    return isinstance(model, DistributedDataParallel)


def disable_ddp_sync(model: DistributedDataParallel) -> None:
    """Stop DDP from all-reducing in backward: what ``no_sync()`` does, for good."""
    model.require_backward_grad_sync = False


def all_reduce_sums(tensors: list[torch.Tensor], group: Any) -> None:
    """Sum ``tensors`` in place across ``group``, one collective per dtype and device."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def all_reduce_count(n: int, group: Any, device: torch.device) -> int:
    """Sum an integer count across ``group``."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t[0])
