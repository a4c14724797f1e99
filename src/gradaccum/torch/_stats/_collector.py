"""PerSampleGradStats: per-sample gradient moments gathered during ordinary backward passes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..._core.moments import Moments
from ._fallback import BATCHED_KWARGS, batch_dims, loop_per_sample, vmap_per_sample
from ._merge import merge_sums_into
from ._reductions import TorchMoments
from ._registry import LayerStats, lookup

log = logging.getLogger("gradaccum")


@dataclass
class _Unit:
    """A module whose parameters get statistics together: a registered layer, or a
    fallback module with its whole subtree."""

    name: str
    module: nn.Module
    entry: LayerStats | None  # None: the per-sample loop
    params: dict[str, nn.Parameter]  # local name -> parameter


@dataclass
class _Call:
    unit: _Unit
    args: tuple
    kwargs: dict[str, Any]
    batch: int
    grads: list[torch.Tensor | None] = field(default_factory=list)


class PerSampleGradStats:
    """Sum and sum of squares of per-sample gradients, per parameter, across increments.

    Run a backward of the **sum** of per-sample losses (or ``mean * count``) of an
    increment, then call ``commit()``: the increment's count, mean and M2 are merged
    into the running moments with Chan's formula (DESIGN.md section 2). Hooks on each
    layer see its input and output gradient; a registry maps layer types to exact
    formulas (``nn.Linear`` on 2-D input needs one extra GEMM and no per-sample
    gradient), and modules no entry covers (recurrent layers, attention, custom ones)
    take an exact per-sample loop. ``paths`` tells which layer took which path.

    Args:
      model: the module whose trainable parameters get statistics.
      chunk_elements: bound on the elements of per-sample gradients held at once by
        the per-sample paths (the batch is processed in chunks below it).

    BatchNorm in train mode mixes the samples of a batch, so per-sample gradients are
    not defined: a forward through one raises ValueError.
    """

    def __init__(self, model: nn.Module, *, chunk_elements: int = 1 << 24) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters: there are no gradients to gather statistics of")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        self.chunk_elements = chunk_elements
        self.paths: dict[str, str] = {}
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._units = self._find_units(model)
        self._handles = [u.module.register_forward_hook(self._forward_hook(u), with_kwargs=True) for u in self._units]
        self._replaying = False
        self._moments: list[Moments] | None = None
        self._scratch: list[torch.Tensor] | None = None
        self._reset_increment()

    # ------------------------------------------------------------------ setup
    def _find_units(self, model: nn.Module) -> list[_Unit]:
        units: list[_Unit] = []
        covered: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in covered):
                continue
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            entry = lookup(module)
            if entry is not None and entry.subtree:
                subtree = {n: p for n, p in module.named_parameters() if p.requires_grad}
                if subtree:
                    units.append(_Unit(name, module, entry, subtree))
                    covered.append(name)
                    self.paths[name or type(module).__name__] = entry.name
            elif entry is not None and own:
                units.append(_Unit(name, module, entry, own))
                self.paths[name or type(module).__name__] = entry.name
            elif own:
                subtree = {n: p for n, p in module.named_parameters() if p.requires_grad}
                units.append(_Unit(name, module, None, subtree))
                covered.append(name)
                label = name or type(module).__name__
                self.paths[label] = "fallback"
                log.info("gradaccum: %s (%s) has no registered statistics; using the exact vmap/loop fallback",
                         label, type(module).__name__)
        return units

    def remove(self) -> None:
        """Remove the hooks; the statistics gathered so far stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, unit: _Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if self._replaying or not torch.is_grad_enabled():
                return
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    f"per-sample statistics are not defined for BatchNorm in train mode ({unit.name}): it "
                    "normalises over the batch, mixing samples; use GroupNorm/LayerNorm or put it in eval mode"
                )
            in_dim = batch_dims(module, 1)[0]
            first = args[0] if args else next(iter(kwargs.values()))
            call = _Call(unit, tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()},
                         int(first.shape[in_dim]))
            outputs, _ = tree_flatten(output)
            call.grads = [None] * len(outputs)
            for p in unit.params.values():
                self._uses[id(p)] = self._uses.get(id(p), 0) + 1
            self._calls.append(call)
            for k, o in enumerate(outputs):
                if isinstance(o, torch.Tensor) and o.requires_grad:
                    o.register_hook(self._grad_hook(call, k))

        return hook

    def _grad_hook(self, call: _Call, k: int):
        def hook(grad: torch.Tensor) -> None:
            call.grads[k] = grad.detach()

        return hook

    # ------------------------------------------------------------------ increments
    def _reset_increment(self) -> None:
        self._calls: list[_Call] = []
        self._uses: dict[int, int] = {}

    def discard(self) -> None:
        """Forget the increment recorded since the last ``commit`` (for a skipped micro-batch)."""
        self._reset_increment()

    def commit(self, sums: list[torch.Tensor | None] | None = None,
               reduce: Callable[[list[torch.Tensor], int], int] | None = None) -> int:
        """Merge the increment whose backward just ran; returns its sample count.

        Args:
          sums: this increment's gradient of the summed loss per parameter (in the order
            of ``params``). By default ``p.grad``, which must then hold this increment only.
          reduce: under data parallelism, sums the increment's gradient sums, sums of
            squares (in place, given copies) and sample count over processes and returns
            the total count, so every process merges the same global increment.
        """
        calls = [c for c in self._calls if any(g is not None for g in c.grads)]
        if not calls:
            raise ValueError("no layer saw a backward since the last commit: run the increment's backward first")
        batch = {c.batch for c in calls}
        if len(batch) != 1:
            raise ValueError(
                f"layers saw different batch sizes {sorted(batch)} in one increment: per-sample statistics need "
                "every layer to see the samples on the batch dimension (dim 0, or batch_first=False recurrent dims)"
            )
        n = batch.pop()
        squares: list[torch.Tensor | None] = [None] * len(self.params)
        tied: dict[int, torch.Tensor] = {}
        for call in calls:
            self._add_call(call, n, squares, tied)
        for i, per_sample in tied.items():
            squares[i] = (per_sample * per_sample).sum(0)
        if sums is None:
            sums = [p.grad for p in self.params]
        firsts: list[torch.Tensor] = []
        seconds: list[torch.Tensor] = []
        for p, s1, s2 in zip(self.params, sums, squares):
            if s1 is not None and s2 is None:
                self._reset_increment()
                raise ValueError(f"parameter {self._names.get(id(p), '?')} got a gradient outside the forward of "
                                 "its module, so no hook saw its per-sample gradients")
            firsts.append(torch.zeros_like(p) if s1 is None else s1.detach())
            seconds.append(torch.zeros_like(p) if s2 is None else s2)
        if reduce is not None:
            firsts = [s1.clone() for s1 in firsts]
            n = reduce(firsts + seconds, n)
        self._moments = merge_sums_into(self._moments, firsts, seconds, n)
        self._reset_increment()
        return n

    def commit_empty(self, reduce: Callable[[list[torch.Tensor], int], int]) -> int:
        """Take part in a data-parallel increment for which this process has no samples
        (its micro-batch was skipped): contribute zeros, merge what the others saw."""
        self._reset_increment()
        firsts = [torch.zeros_like(p) for p in self.params]
        seconds = [torch.zeros_like(p) for p in self.params]
        n = reduce(firsts + seconds, 0)
        if n > 0:
            self._moments = merge_sums_into(self._moments, firsts, seconds, n)
        return n

    def _add_call(self, call: _Call, n: int, squares: list[torch.Tensor | None], tied: dict[int, torch.Tensor]) -> None:
        unit = call.unit
        needs_per_sample = {k for k, p in unit.params.items() if self._uses.get(id(p), 0) > 1}
        if unit.entry is None:
            self._add_per_sample(unit, self._fallback(unit, call, n), squares, tied, needs_per_sample)
            return
        d = call.grads[0]
        if d is None:
            return
        fast = unit.entry.sum_squares(unit.module, call.args, d) if unit.entry.sum_squares and not needs_per_sample else None
        if fast is not None:
            self.paths[unit.name or type(unit.module).__name__] = f"{unit.entry.name}:sum_squares"
            for k, s in fast.items():
                _add(squares, self._index[id(unit.params[k])], s)
            return
        self.paths[unit.name or type(unit.module).__name__] = f"{unit.entry.name}:per_sample"
        if unit.entry.subtree and any(g is not None for g in call.grads[1:]):
            raise ValueError(f"{unit.name}: per-sample statistics use only the module's first output; "
                             "its other outputs (attention weights?) must not reach the loss")
        numel = sum(p.numel() for p in unit.params.values())
        chunk = max(1, self.chunk_elements // numel)
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            args = tuple(a.narrow(0, start, size) if isinstance(a, torch.Tensor) else a for a in call.args)
            extra: tuple = ()
            if unit.entry.subtree:
                extra = ({k: v.narrow(0, start, size) if k in BATCHED_KWARGS and isinstance(v, torch.Tensor) else v
                          for k, v in call.kwargs.items()},)
            per_sample = unit.entry.per_sample(unit.module, args, d.narrow(0, start, size), *extra)
            self._add_per_sample(unit, per_sample, squares, tied, needs_per_sample, offset=start, batch=n)

    def _fallback(self, unit: _Unit, call: _Call, n: int) -> dict[str, torch.Tensor]:
        """vmap over samples where it works for this module, else the per-sample loop."""
        label = unit.name or type(unit.module).__name__
        self._replaying = True
        try:
            if self.paths[label] != "loop":
                try:
                    result = vmap_per_sample(unit.module, call.args, call.kwargs, call.grads, n)
                    self.paths[label] = "vmap"
                    return result
                except Exception as error:  # no batching rule, random ops, data-dependent control flow
                    log.info("gradaccum: vmap failed on %s (%s); using the per-sample loop", label, error)
                    self.paths[label] = "loop"
            return loop_per_sample(unit.module, call.args, call.kwargs, call.grads, n)
        finally:
            self._replaying = False

    def _add_per_sample(self, unit: _Unit, per_sample: dict[str, torch.Tensor], squares: list[torch.Tensor | None],
                        tied: dict[int, torch.Tensor], needs_per_sample: set[str], offset: int = 0,
                        batch: int | None = None) -> None:
        for k, g in per_sample.items():
            i = self._index[id(unit.params[k])]
            if k in needs_per_sample:  # used more than once: sum per-sample gradients before squaring
                if i not in tied:
                    tied[i] = torch.zeros((batch or len(g)), *g.shape[1:], dtype=g.dtype, device=g.device)
                tied[i][offset:offset + len(g)] += g
            else:
                _add(squares, i, (g * g).sum(0))

    # ------------------------------------------------------------------ results
    @property
    def count(self) -> int:
        """Samples merged so far."""
        return 0 if self._moments is None else self._moments[0].n

    def moments(self) -> list[Moments]:
        """Running moments per parameter (order of ``params``), as a list that also
        computes the rules' statistics in fused passes."""
        if self._moments is None:
            raise ValueError("no increment has been committed yet")
        if self._scratch is None:
            self._scratch = [torch.empty_like(m.mean) for m in self._moments]
        return TorchMoments(self._moments, self._scratch)

    def reset(self) -> None:
        """Start a new window: forget the running moments."""
        self._moments = None
        self._reset_increment()

    def state_dict(self) -> dict[str, Any]:
        """The running moments (for a checkpoint taken mid-window)."""
        if self._moments is None:
            return {"moments": None}
        return {"moments": [(m.n, m.mean.clone(), m.m2.clone()) for m in self._moments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s moments."""
        moments = state["moments"]
        if moments is not None and len(moments) != len(self.params):
            raise ValueError(f"state holds moments of {len(moments)} parameters, the model has {len(self.params)}")
        self._moments = None if moments is None else [Moments(n, mean, m2) for n, mean, m2 in moments]
        self._reset_increment()


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _add(squares: list[torch.Tensor | None], i: int, s: torch.Tensor) -> None:
    squares[i] = s if squares[i] is None else squares[i] + s
