"""Gradient synchronisation under DistributedDataParallel, and the contract ranks keep.

The Accumulator switches off DDP's own per-backward all-reduce and reduces the window's
*summed* gradients and item counts itself when the window closes. That is one reduction
per window however the window ends (a fixed k, an adaptive rule that decides after the
backward, or a flush), and it weights ranks by their item counts instead of DDP's plain
average over ranks, which is wrong when ranks see different numbers of tokens.

Every rank must make the same collectives in the same order: the same number of
``backward`` calls per window, ``flush`` together. A rank that breaks that used to hang
for the process group's timeout (30 minutes), abort in C++ on a size mismatch, or, where
sizes happened to match, pair different windows silently. So each of the Accumulator's
collectives is preceded by a small fixed-size header (what the collective is, window,
micro-batch, element count) all-gathered over its own process group, whose timeout is
short and configurable: a mismatch raises on every rank, naming what each rank did; a
rank that never arrives times out with the contract in the message. The close's header also
carries what every rank's step must apply alike (the lr schedule's factor, the lr scaling,
clipping, the optimizer's learning rates): ranks that differ there would step apart, their
weights diverging with no error.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

KINDS = {1: "a statistics increment (backward)", 2: "the window's close (the rule)", 3: "flush()",
         4: "a norm-statistics increment (backward)", 5: "the window's per-layer norm sums (close)",
         6: "a sharded micro-batch (before its backward)", 7: "a sharded micro-batch's gradient check"}
INCREMENT, CLOSE, FLUSH, NORMS, LAYERS, GATE, CHECK = 1, 2, 3, 4, 5, 6, 7
PAYLOAD = 8  # float64 slots a header carries after its four fields (scalars, then settings to agree on)


def is_ddp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is wrapped in DistributedDataParallel."""
    return isinstance(model, DistributedDataParallel)


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def check_launched_world() -> None:
    """Refuse a process group that does not span the processes a launcher started.

    torchrun (and other launchers) set ``WORLD_SIZE`` to the number of processes they start.
    A script that initialises its own group instead (a ``file://`` rendezvous with
    ``world_size=1``, say) gives each process a group of its own: every process then trains
    an independent copy of the model on its own data, with no error. When ``WORLD_SIZE`` is
    set and is not the default process group's size, that is refused here, before anything
    is changed."""
    launched = os.environ.get("WORLD_SIZE", "").strip()
    if not launched.isdigit() or not dist.is_initialized():
        return
    world = dist.get_world_size()
    if int(launched) != world:
        raise ContractError(
            f"the launcher started WORLD_SIZE={launched} processes, but this process's default process group has "
            f"{world} rank(s): each process would train a copy of its own. Initialise the process group from the "
            "launcher's environment (dist.init_process_group(backend), whose env:// rendezvous reads RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE when the process runs alone")


def sum_fsdp_gradients(model: torch.nn.Module) -> None:
    """Make every FSDP2 module's reduce-scatter a plain sum over ranks, after every backward:
    the Accumulator divides by the window's global item count when it closes (FSDP's default
    divides by the number of ranks, which weights ranks equally whatever their items).

    A divide factor alone is not enough: for float32 and bfloat16 gradients FSDP folds the
    factor into the collective as ``ReduceOp.PREMUL_SUM(1 / factor)``, which only NCCL has
    (gloo refuses it at the first backward). Forcing sum-only reductions makes it a
    ``ReduceOp.SUM`` followed by a division by 1.0, which FSDP skips: the same plain sum on
    every backend and dtype."""
    from torch.distributed.fsdp import FSDPModule

    check_launched_world()  # before the model's settings change
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
            module.set_requires_gradient_sync(True)


def local(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Each tensor's local shard (a DTensor's ``to_local()``; other tensors as they are)."""
    return [t.to_local() if t is not None and hasattr(t, "to_local") else t for t in tensors]


def sum_over_ranks(tensors: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """The tensors summed over the group's ranks, in one float64 all-reduce; each returned in
    its own dtype and shape."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def disable_ddp_sync(model: DistributedDataParallel) -> None:
    """Stop DDP from all-reducing in backward: what ``no_sync()`` does, for good."""
    model.require_backward_grad_sync = False


class ContractError(RuntimeError):
    """Ranks broke the data-parallel contract (different collectives at the same point)."""


class RankContract:
    """The Accumulator's own process group (same ranks as the model's) and its headers."""

    def __init__(self, model: DistributedDataParallel, timeout: float) -> None:
        check_launched_world()
        parent = getattr(model, "process_group", None)
        ranks = dist.get_process_group_ranks(parent) if parent is not None else None
        self.timeout = timeout
        self.group = dist.new_group(ranks=ranks, timeout=timedelta(seconds=timeout))
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.last: tuple[int, int, int] | None = None  # (kind, window, micro-batch) of the last completed collective
        if is_fsdp(model):
            guard_fsdp_collectives(model, self)

    def agree(self, kind: int, window: int, micro_batch: int, numel: int, payload: tuple[float, ...] = (),
              settings: dict[str, float] | None = None) -> list[tuple[float, ...]]:
        """All-gather this rank's header; raise on every rank if they differ. The header
        carries up to ``PAYLOAD`` float64 values beside its fields: every rank gets every
        rank's ``payload`` back (the norm path's scalars travel this way, so an increment
        costs one small collective), and ``settings``, named values every rank must hold alike."""
        values = tuple((settings or {}).values())
        if len(payload) + len(values) > PAYLOAD:
            raise ValueError(f"a header carries at most {PAYLOAD} values, got {len(payload) + len(values)}")
        header = torch.zeros(4 + PAYLOAD, dtype=torch.float64)  # every header has this shape: a mismatch is readable
        header[:4] = torch.tensor([kind, window, micro_batch, numel], dtype=torch.float64)
        header[4:4 + len(payload) + len(values)] = torch.tensor((*payload, *values), dtype=torch.float64)
        gathered = [torch.zeros_like(header) for _ in range(self.world)]
        self._run(lambda: dist.all_gather(gathered, header, group=self.group), kind, window, micro_batch)
        if any(not torch.equal(g[:4], gathered[0][:4]) for g in gathered):
            said = "; ".join(f"rank {r}: {KINDS.get(int(g[0]), '?')} at window {int(g[1])}, micro-batch {int(g[2])}"
                             for r, g in enumerate(gathered))
            raise ContractError(
                f"data-parallel ranks disagree ({said}). Every rank must call Accumulator.backward the same "
                "number of times per window and call flush() together; the window is left as it was")
        if settings:
            self._check_settings(list(settings), [g[4 + len(payload):4 + len(payload) + len(values)].tolist()
                                                  for g in gathered])
        return [tuple(g[4:4 + len(payload)].tolist()) for g in gathered]

    @staticmethod
    def _check_settings(names: list[str], said: list[list[float]]) -> None:
        """Raise ``ContractError`` naming the settings the ranks hold differently, and each rank's value."""
        differ = [k for k, name in enumerate(names) if any(values[k] != said[0][k] for values in said)]
        if not differ:
            return
        shown = "; ".join(f"rank {r}: " + ", ".join(f"{names[k]} {values[k]!r}" for k in differ)
                          for r, values in enumerate(said))
        raise ContractError(
            f"data-parallel ranks disagree on what the step applies ({shown}). Build every rank's Accumulator "
            "with the same lr_schedule, lr_scaling, reference_batch and clip_grad_norm, and give every rank's "
            "optimizer the same learning rates, or the ranks' weights diverge; the window is left as it was")

    def all_reduce(self, tensors: list[torch.Tensor], kind: int, window: int, micro_batch: int) -> None:
        """Sum ``tensors`` in place across ranks, one collective per dtype and device."""
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.dtype, t.device), []).append(t)
        for bucket in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in bucket])
            self._run(lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group),
                      kind, window, micro_batch)
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset: offset + n].view_as(t))
                offset += n

    def _run(self, collective: Any, kind: int, window: int, micro_batch: int) -> None:
        try:
            collective()
            self.last = (kind, window, micro_batch)
        except RuntimeError as error:
            raise ContractError(
                f"rank {self.rank}: the Accumulator's collective for {KINDS[kind]} at window {window}, micro-batch "
                f"{micro_batch} did not complete within {self.timeout:g} s ({error}). Every rank must call "
                "Accumulator.backward the same number of times per window and flush() together; a rank that "
                "stopped early or raised leaves the others waiting (collective_timeout sets the wait)") from error

    def peer_failed(self, collective: str, group: Any, error: RuntimeError) -> ContractError:
        """The error for one of FSDP's own collectives (outside the contract's) that failed on
        this rank: it names the ranks that could have left it, and the Accumulator's last
        agreed point."""
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        me = dist.get_rank()
        others = [r for r in ranks if r != me]
        who = f"the other rank, rank {others[0]}," if len(others) == 1 else f"one of the other ranks {others}"
        where = "" if self.last is None else \
            f" (the ranks last agreed on {KINDS[self.last[0]]} at window {self.last[1]}, micro-batch {self.last[2]})"
        return ContractError(
            f"rank {me}: FSDP's {collective} over ranks {ranks} did not complete{where}: {who} raised in its forward "
            "or backward, or stopped, before completing it (its own error says why). Every rank's forward and "
            "backward of a fully_shard-ed model join these collectives, so one rank's failure fails them on the "
            f"others. The backend said: {error}")


class _Guarded:
    """Mixed into one of FSDP2's default comms: a failure of the collective raises the
    contract's ContractError naming the ranks, the backend's error chained."""

    collective: str
    contract: RankContract

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        except RuntimeError as error:
            raise self.contract.peer_failed(self.collective, kwargs.get("group"), error) from error


@functools.cache
def _guarded_comms() -> dict[type, type]:
    """FSDP2's default all-gather and reduce-scatter, each mapped to its guarded subclass
    (empty where this torch does not have them)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
    except ImportError:
        return {}
    return {base: type(f"Guarded{base.__name__}", (_Guarded, base), {"collective": name})
            for base, name in ((DefaultAllGather, "all-gather"), (DefaultReduceScatter, "reduce-scatter"))}


def guard_fsdp_collectives(model: torch.nn.Module, contract: RankContract) -> None:
    """Make FSDP2's all-gathers and reduce-scatters on ``model`` raise a ContractError naming
    the ranks when they fail on this rank, as the contract's own collectives do.

    A rank whose forward or backward raises never joins the FSDP collectives the others are
    in: they fail there with the backend's bare error ("Connection reset by peer" once that
    rank's process is gone; after the model's process-group timeout while it lives). Only
    FSDP's default comms are wrapped (a custom one set with ``set_custom_all_gather`` or
    ``set_custom_reduce_scatter`` is left as it is), as subclasses that FSDP treats as the
    defaults; a later Accumulator over the same model takes them over. An all-gather that FSDP
    issues asynchronously (a prefetch, ``unshard(async_op=True)``) fails at its wait, inside
    FSDP, with the backend's error."""
    from torch.distributed.fsdp import FSDPModule

    guarded = _guarded_comms()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in getattr(module._get_fsdp_state(), "_fsdp_param_groups", ()):
            for attribute in ("_all_gather_comm", "_reduce_scatter_comm"):
                comm = getattr(group, attribute, None)
                if type(comm) in guarded:
                    comm = guarded[type(comm)]()
                    setattr(group, attribute, comm)
                if isinstance(comm, _Guarded):
                    comm.contract = contract
