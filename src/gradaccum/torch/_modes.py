"""The Accumulator's distribution mode: one object, chosen when the Accumulator is built.

- ``LocalMode``: one process; nothing to agree on or reduce.
- ``DDPMode`` (DistributedDataParallel): DDP's own per-backward all-reduce is off for good, as
  under ``no_sync()``; the window's gradient sums and counts are all-reduced once, when it
  closes, and the norm statistics' scalars travel in the close's header.
- ``FSDP2Mode`` (``fully_shard``): every backward's gradient is reduce-scattered as a plain sum
  over ranks into the window's sharded sum, so before each backward the ranks agree that each has
  items and whether every loss is finite, after it whether every shard is finite, and at the
  close only the counts are agreed (one small collective each).

Every mode answers the same calls (what happens before a micro-batch's backward, its finiteness
check, the increment reduce of per-element moments, the close's totals, the pooling of the norm
statistics), so the Accumulator's ``backward`` and close read straight through whatever the mode.
``window`` and ``micro_batch`` name the point of the run in every collective's header
(``RankContract``), so that ranks at different points raise instead of pairing up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._core.noise_scale import NormSums
from .._core.rules import StoppingRule, statistics_kind
from ._distributed import (
    CHECK,
    GATE,
    INCREMENT,
    LAYERS,
    NORMS,
    RankContract,
    disable_ddp_sync,
    is_ddp,
    is_fsdp,
    local,
    sum_fsdp_gradients,
)
from ._nonfinite import all_finite, finite_loss
from ._stats._sharded import is_sharded, shard_group
from ._window_sums import MomentWindowSums, UnshiftedWindowSums, WindowSums

Settings = Callable[[], dict[str, float]]  # what every rank's step applies alike (read only where agreed)
Totals = tuple[int, int, bool]  # the window's items, samples, and whether it is poisoned


class DistributionMode:
    """What a mode does at each point of a window; these answers are one process's (``LocalMode``):
    nothing is agreed or reduced."""

    contract: RankContract | None = None
    window_sums: type[WindowSums] = WindowSums  # the window buffer for sums apart from per-element moments
    holds_moments = True  # per-element statistics may hold the window's sum (MomentWindowSums)
    reduces_increments = False  # per-element statistics' increments are all-reduced as they come

    def statistics_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module per-sample statistics hook into."""
        return model

    def shard_group(self, params: list[torch.nn.Parameter], names: list[str]) -> Any:
        """The process group the gradients are sharded over (the micro-batch source sums its
        norms over it), or None."""
        return None

    def connect(self, model: torch.nn.Module, timeout: float) -> None:
        """Take over the model's gradient synchronisation (last in the Accumulator's construction)."""

    def shards(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """What this process holds of each gradient."""
        return grads

    def before_backward(self, loss: torch.Tensor, count: int, window: int, micro_batch: int) -> bool | None:
        """Before a micro-batch's backward: whether every rank's loss is finite where the ranks
        must agree on it (FSDP2), else None (the loss is this process's business)."""
        return None

    def agree_finite(self, mine: bool, window: int, micro_batch: int) -> bool:
        """Whether the micro-batch is finite everywhere, given this process's check."""
        return mine

    def reduce_increment(self, tensors: list[torch.Tensor], n: int, window: int, micro_batch: int) -> int:
        """Sum a per-element increment's moments and samples over ranks (DDP only)."""
        raise NotImplementedError(f"{type(self).__name__} reduces no increments")

    def window_totals(self, window_sums: WindowSums, totals: Totals, check_sums: bool, kind: int,
                      settings: Settings, window: int, micro_batch: int) -> Totals:
        """The window's items, samples and whether it is poisoned, over every rank; the sums in
        ``.grad`` are screened here once when ``check_sums``."""
        items, samples, poisoned = totals
        if check_sums and not poisoned:
            poisoned = not all_finite(window_sums.sums)
        return items, samples, poisoned

    def pool_norm_sums(self, sums: NormSums, window: int, micro_batch: int) -> NormSums:
        """The model's norm sums over every rank."""
        return sums

    def pool_layer_sums(self, layers: dict[str, NormSums], window: int, micro_batch: int) -> dict[str, NormSums]:
        """Each layer's norm sums over every rank."""
        return layers

    def measures_reduced_sums(self, source: Any) -> bool:
        """Whether the close's record takes the norm statistics from the window sum it reduced
        over ranks (``global_norm_sums``, after ``window_totals``) instead of pooling each rank's
        before it."""
        return False

    def global_norm_sums(self, source: Any, window_sums: list[torch.Tensor | None], scale: float, window: int,
                         micro_batch: int) -> tuple[NormSums, dict[str, NormSums]]:
        """The model's and each layer's norm sums over every rank's micro-batches, from the
        reduced window sum (where ``measures_reduced_sums``)."""
        raise NotImplementedError(f"{type(self).__name__} pools the norm statistics before the close's reduce")


class LocalMode(DistributionMode):
    """One process: the window's sums and counts are this process's."""


class _Connected(DistributionMode):
    """A mode whose ranks keep the contract (``RankContract``): its collectives and headers."""

    def connect(self, model: torch.nn.Module, timeout: float) -> None:
        self.contract = RankContract(model, timeout)  # type: ignore[arg-type]

    @property
    def ranks(self) -> RankContract:
        """The contract (made by ``connect``)."""
        assert self.contract is not None, "connect() makes the contract"
        return self.contract


class DDPMode(_Connected):
    """DistributedDataParallel: sums and counts all-reduced once per window, at its close."""

    reduces_increments = True

    def statistics_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module  # type: ignore[return-value]

    def connect(self, model: torch.nn.Module, timeout: float) -> None:
        disable_ddp_sync(model)  # type: ignore[arg-type]
        super().connect(model, timeout)

    def reduce_increment(self, tensors: list[torch.Tensor], n: int, window: int, micro_batch: int) -> int:
        count = torch.tensor([n], dtype=torch.int64, device=tensors[0].device)
        self.ranks.agree(INCREMENT, window, micro_batch, sum(t.numel() for t in tensors))
        self.ranks.all_reduce([*tensors, count], INCREMENT, window, micro_batch)
        return int(count[0])

    def window_totals(self, window_sums: WindowSums, totals: Totals, check_sums: bool, kind: int,
                      settings: Settings, window: int, micro_batch: int) -> Totals:
        """The window's sums and counts summed over ranks, after the header (with what the step
        applies) is agreed: a disagreement raises before the window changes."""
        items, samples, poisoned = totals
        moments = isinstance(window_sums, MomentWindowSums)  # it reduces one flag per parameter
        params = window_sums.params
        numel = len(params) if moments else sum(p.numel() for p in params)
        self.ranks.agree(kind, window, micro_batch, numel, settings=settings())
        sums = window_sums.true_sums()  # ranks may have shifted their counts differently
        counts = torch.tensor([items, samples, int(poisoned)], dtype=torch.int64, device=sums[0].device)
        self.ranks.all_reduce([*sums, counts], kind, window, micro_batch)
        reduced = int(counts[0]), int(counts[1]), bool(counts[2] > 0)
        return super().window_totals(window_sums, reduced, check_sums, kind, settings, window, micro_batch)

    def pool_norm_sums(self, sums: NormSums, window: int, micro_batch: int) -> NormSums:
        """Each rank's norm sums travel in the contract's header: one small collective."""
        gathered = self.ranks.agree(NORMS, window, micro_batch, 0, tuple(sums))
        return NormSums(*(math.fsum(column) for column in zip(*gathered)))

    def pool_layer_sums(self, layers: dict[str, NormSums], window: int, micro_batch: int) -> dict[str, NormSums]:
        """The ranks' per-layer norm sums, pooled by one small all-reduce."""
        names = list(layers)  # the same model on every rank: the same layers, in the same order
        flat = torch.tensor([v for name in names for v in layers[name]], dtype=torch.float64)
        self.ranks.agree(LAYERS, window, micro_batch, flat.numel())
        self.ranks.all_reduce([flat], LAYERS, window, micro_batch)
        width = len(NormSums._fields)
        return {name: NormSums(*flat[k * width:(k + 1) * width].tolist()) for k, name in enumerate(names)}

    def measures_reduced_sums(self, source: Any) -> bool:
        """A source that measures the reduced window sum (the micro-batch source: every rank's
        micro-batches are micro-batches of one window) gives one process's estimate over all."""
        return callable(getattr(source, "global_norm_sums", None))

    def global_norm_sums(self, source: Any, window_sums: list[torch.Tensor | None], scale: float, window: int,
                         micro_batch: int) -> tuple[NormSums, dict[str, NormSums]]:
        """The source's terms from the reduced sums; its per-rank scalars summed by one small
        all-reduce, after a header."""
        def all_reduce(tensors: list[torch.Tensor]) -> None:
            self.ranks.agree(LAYERS, window, micro_batch, sum(t.numel() for t in tensors))
            self.ranks.all_reduce(tensors, LAYERS, window, micro_batch)
        return source.global_norm_sums(window_sums, scale, all_reduce)


class FSDP2Mode(_Connected):
    """FSDP2 (``fully_shard``): each backward reduce-scatters a plain sum over ranks into the
    window's sharded sum; the ranks agree on scalars (items, finiteness) around it."""

    window_sums = UnshiftedWindowSums  # one seed scale on every rank: the reduce-scatter sums them
    holds_moments = False

    def __init__(self, model: torch.nn.Module, rule: StoppingRule, scaler: Any) -> None:
        if rule.needs_statistics and statistics_kind(rule) != "norms":
            raise ValueError(f"rule: {type(rule).__name__} needs per-element statistics, which are not taken on "
                             "a model sharded with fully_shard (each rank would need its shard's moments over every "
                             "rank's samples); use a norm rule (NormTest, the noise-scale planners), FixedSteps "
                             "or BatchRamp, or DDP (with source='per_sample')")
        if scaler is not None:
            raise ValueError("scaler: a GradScaler is not supported with fully_shard; use bf16 or 32-bit")
        sum_fsdp_gradients(model)

    def shard_group(self, params: list[torch.nn.Parameter], names: list[str]) -> Any:
        return shard_group(params, names) if is_sharded(params) else None

    def shards(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return local(grads)

    def before_backward(self, loss: torch.Tensor, count: int, window: int, micro_batch: int) -> bool:
        """Every rank's backward joins the reduce-scatter of the gradient, so before it the
        ranks agree (one small collective) that each has items, and whether every loss is
        finite: a micro-batch is the global increment, kept or dropped on every rank."""
        said = self.ranks.agree(GATE, window, micro_batch, 0, (float(count), float(finite_loss(loss))))
        empty = [rank for rank, (items, _) in enumerate(said) if items == 0]
        if empty:
            raise ValueError(
                f"count: rank(s) {empty} have no items in this micro-batch. Under fully_shard every rank's backward "
                "joins the gradient's reduce-scatter, so a micro-batch without items cannot sit out on one rank; "
                "leave such micro-batches out on every rank alike (the window is unchanged)")
        return all(finite == 1.0 for _, finite in said)

    def agree_finite(self, mine: bool, window: int, micro_batch: int) -> bool:
        """Every rank's shard checked, and the answer agreed (one small collective)."""
        said = self.ranks.agree(CHECK, window, micro_batch, 0, (float(mine),))
        return all(finite == 1.0 for (finite,) in said)

    def window_totals(self, window_sums: WindowSums, totals: Totals, check_sums: bool, kind: int,
                      settings: Settings, window: int, micro_batch: int) -> Totals:
        """The window's sums are already summed over ranks (shards of them); only the items,
        samples and whether any rank's shard is poisoned are agreed, with what the step
        applies: one small collective per window."""
        items, samples, poisoned = totals
        poisoned = poisoned or (check_sums and not all_finite(local(window_sums.sums)))
        said = self.ranks.agree(kind, window, micro_batch, 0, (float(items), float(samples), float(poisoned)),
                                   settings())
        return int(sum(s[0] for s in said)), int(sum(s[1] for s in said)), any(s[2] > 0 for s in said)


def distribution_mode(model: torch.nn.Module, rule: StoppingRule, scaler: Any) -> DistributionMode:
    """The mode of ``model`` (plain, DistributedDataParallel or ``fully_shard``-ed), its
    settings checked against the rule and scaler; FSDP2's reductions are made plain sums here.
    ``connect`` takes over the gradient synchronisation once the Accumulator is built."""
    if is_ddp(model):
        return DDPMode()
    if is_fsdp(model):
        return FSDP2Mode(model, rule, scaler)
    return LocalMode()
