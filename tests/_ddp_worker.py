"""One rank of the DDP test (tests/test_ddp.py): gloo on loopback, float64.

Usage: python -m tests._ddp_worker RANK WORLD PORT OUT_DIR NONFINITE_POLICY
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradaccum import FixedSteps
from gradaccum.torch import Accumulator

from .reference import GradCapture, ce_mean, classification, mlp, take

K = 3
# Micro-batch sizes per rank differ: DDP's plain average over ranks would be wrong here.
SIZES = {0: [2, 5, 1, 4, 3, 2, 6, 1], 1: [3, 1, 4, 4, 2, 5, 1, 2]}


def rank_data(rank: int):
    return classification(sum(SIZES[rank]), seed=10 + rank)


def main(rank: int, world: int, port: int, out: Path, nonfinite: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DistributedDataParallel(mlp())
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(K), nonfinite=nonfinite)

    calls: list[int] = []
    current = {"micro": -1}
    original = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(current["micro"])
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    ddp_hook_calls = []

    def hook(state, bucket):
        ddp_hook_calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, hook)

    data = rank_data(rank)
    start = 0
    for i, n in enumerate(SIZES[rank]):
        current["micro"] = i
        part = take(data, slice(start, start + n))
        start += n
        loss, count = ce_mean(model, part)
        acc.backward(loss, count)
    current["micro"] = len(SIZES[rank])
    acc.flush()
    dist.all_reduce = original
    torch.save({"seen": opt.seen, "params": [p.detach() for p in model.module.parameters()],
                "calls": calls, "ddp_hook_calls": len(ddp_hook_calls),
                "items": [r.items for r in acc.history]}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
