"""One rank of the FSDP2 tests in tests/test_fsdp.py that need a worker of their own: gloo on
loopback, a file rendezvous in the test's directory, a short process-group timeout.

Usage: python -m tests._fsdp_worker RANK WORLD OUT_DIR MODE

MODE "float32": FixedSteps(K) over the DDP test's uneven micro-batches (tests/_ddp_worker.py)
on a float32 model sharded by fully_shard. "backward_raises": rank 1's backward raises half-way
through micro-batch 4; each rank records the error its Accumulator.backward raised, and rank 1's
process ends there, as a script's would. "launch_mismatch" (one process, WORLD_SIZE=2 in its
environment): an Accumulator over a model in a process group of one process is refused.
"micro_batch": NormTest and NoiseScalePlanner with source="micro_batch" on the float64 sharded
model over the DDP test's micro-batches; each window's record (its noise terms) is kept.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gradaccum import FixedSteps, NoiseScalePlanner, NormTest
from gradaccum.torch import Accumulator

from ._ddp_worker import SIZES, K, rank_data
from .reference import GradCapture, ce_mean, mlp, take

RAISE_AT = 4  # rank 1's micro-batch whose backward raises (window 1, its second)


def sharded(dtype: torch.dtype) -> torch.nn.Module:
    """The reference MLP in ``dtype``, each Linear and the root sharded by fully_shard."""
    from torch.distributed.fsdp import fully_shard

    model = mlp().to(dtype)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def micro_batches(rank: int, dtype: torch.dtype) -> list:
    data = rank_data(rank)
    parts, start = [], 0
    for n in SIZES[rank]:
        part = take(data, slice(start, start + n))
        parts.append(type(part)(part.x.to(dtype), part.y))
        start += n
    return parts


def run_float32(rank: int, out: Path) -> None:
    from torch.distributed.tensor import DTensor

    model = sharded(torch.float32)
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(K))
    for part in micro_batches(rank, torch.float32):
        acc.backward(*ce_mean(model, part))
    acc.flush()
    seen = [[g.full_tensor() if isinstance(g, DTensor) else g for g in step] for step in opt.seen]
    torch.save({"seen": seen, "params": [p.full_tensor().detach() for p in model.parameters()],
                "items": [r.items for r in acc.history]}, out / f"rank{rank}.pt")


MICRO_THETA = 1.5  # NormTest's theta on the micro-batch source: windows of a few micro-batches


def micro_batch_rules() -> list:
    """The rules the "micro_batch" mode runs, in order (each on a fresh model)."""
    return [NormTest(MICRO_THETA, source="micro_batch"),
            NoiseScalePlanner(1.0, min_batch=8, max_batch=24, micro_batch=4, source="micro_batch")]


def run_micro_batch(rank: int, out: Path) -> None:
    """Each rule of ``micro_batch_rules`` over this rank's micro-batches (lr 0.1): the squared
    norms of each micro-batch's sharded gradient are summed over the ranks (one small
    all-reduce), so the records are one process's over the union of both ranks' micro-batches."""
    result = []
    for rule in micro_batch_rules():
        model = sharded(torch.float64)
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule)
        for part in micro_batches(rank, torch.float64):
            acc.backward(*ce_mean(model, part))
        acc.flush()
        result.append({"info": [dict(r.info) for r in acc.history],
                       "micro_batches": [r.micro_batches for r in acc.history],
                       "params": [p.full_tensor().detach() for p in model.parameters()]})
    torch.save(result, out / f"rank{rank}.pt")


def run_backward_raises(rank: int, out: Path) -> None:
    """Rank 1 raises in the backward between the last Linear and the one before it: it has
    joined the last layer's collectives, not the middle layer's, which rank 0 waits in."""
    model = sharded(torch.float64)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(K), collective_timeout=60)
    at = [0]  # the micro-batch being fed
    if rank == 1:
        def fail(grad: torch.Tensor) -> torch.Tensor:
            if at[0] == RAISE_AT:
                raise RuntimeError("a failure inside rank 1's backward")
            return grad

        def watch(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            output.register_hook(fail)

        model[3].register_forward_hook(watch)  # the ReLU before the last Linear
    for at[0], part in enumerate(micro_batches(rank, torch.float64)):
        try:
            acc.backward(*ce_mean(model, part))
        except Exception as error:  # noqa: BLE001  # what each rank's script would see
            torch.save({"type": type(error).__name__, "message": str(error)}, out / f"rank{rank}.pt")
            return
    torch.save({"type": None, "message": "no error"}, out / f"rank{rank}.pt")


def run_launch_mismatch(out: Path) -> None:
    """An Accumulator over a sharded model and over a DDP model, in a group of one process
    under WORLD_SIZE=2: both refused, the sharded model's FSDP settings unchanged; with
    WORLD_SIZE=1 the same construction works."""
    from torch.nn.parallel import DistributedDataParallel

    model = sharded(torch.float64)
    groups = [g for m in model.modules() if hasattr(m, "_get_fsdp_state")
              for g in m._get_fsdp_state()._fsdp_param_groups]
    settings = lambda: [(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups]  # noqa: E731
    before = settings()
    result: dict = {}
    for name, net in (("fsdp", model), ("ddp", DistributedDataParallel(mlp()))):
        try:
            Accumulator(net, torch.optim.SGD(net.parameters(), lr=0.1), FixedSteps(K))
        except Exception as error:  # noqa: BLE001
            result[name] = f"{type(error).__name__}: {error}"
    result["fsdp_settings_unchanged"] = settings() == before
    os.environ["WORLD_SIZE"] = "1"
    Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(K))
    result["accepted_with_world_size_1"] = True
    torch.save(result, out / "rank0.pt")


def main(rank: int, world: int, out: Path, mode: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a broken build fails in a minute, not in 30
    if mode == "float32":
        run_float32(rank, out)
    elif mode == "backward_raises":
        run_backward_raises(rank, out)
        sys.stdout.flush()
        os._exit(0)  # no teardown: the other rank may be gone, or rank 1's process ends here
    elif mode == "launch_mismatch":
        run_launch_mismatch(out)
    elif mode == "micro_batch":
        run_micro_batch(rank, out)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    dist.barrier()  # both ranks done before either tears gloo down (else one can abort at exit)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
