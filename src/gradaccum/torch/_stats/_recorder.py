"""The recorder of calls: forward hooks on each layer the statistics cover and on the model.

Each call of a covered module during a forward with gradients on is kept as a ``Call``: its
inputs (detached), its batch sizes, and the gradients its outputs receive in the backward
(tensor hooks). The model's own calls are kept apart: the increment's sample count and the
whole-model fallback replay the call whose outputs reached the loss.

A call whose output does not carry the batch (a position embedding of ``arange(T)``) gets its
output's per-sample gradients from the addition that broadcasts it over the batch: the
recorder hooks that addition in the autograd graph (``tap_broadcast``) and keeps the gradient
it receives on the call (``broadcast_grad``; ``_batch.expanded`` uses it).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ._fallback import batch_dims
from ._registry import LayerStats, lookup

log = logging.getLogger("gradaccum")

Sizes = dict[int, list[tuple[int | None, int | None]]]  # id(module) -> (input, output) batch sizes of its calls


@dataclass
class Unit:
    """A module whose parameters get statistics together: a registered layer, or a
    fallback module with its whole subtree."""

    name: str
    module: nn.Module
    entry: LayerStats | None  # None: the per-sample fallback
    params: dict[str, nn.Parameter]  # local name -> parameter

    @property
    def label(self) -> str:
        return self.name or type(self.module).__name__


@dataclass
class Call:
    unit: Unit | None  # None: the whole model's call
    args: tuple
    kwargs: dict[str, Any]
    in_size: int | None  # leading size of the first tensor input on its batch dim
    out_size: int | None = None
    grads: list[torch.Tensor | None] = field(default_factory=list)
    in_nodes: list[Any] = field(default_factory=list)  # the autograd nodes of its tensor inputs
    out_node: Any = None  # the autograd node of its first output
    out_shape: tuple[int, ...] | None = None  # the shape of its first output
    batched_outputs: list[bool] = field(default_factory=list)  # the model's call: outputs that carry the batch
    broadcast_grad: torch.Tensor | None = None  # the batch-shaped gradient its output was added into
    tap_failed: bool = False  # its output reaches the batch other than by one plain addition
    expanded: bool = False  # a broadcast call rewritten over the batch (``_batch.expanded``)

    @property
    def reached_loss(self) -> bool:
        return any(g is not None for g in self.grads)


def find_units(model: nn.Module, tracked: set[int], paths: dict[str, str]) -> list[Unit]:
    """The modules whose parameters (those in ``tracked``, by id) get statistics: a registered
    layer (with its subtree where its entry says so), else the first module holding a tracked
    parameter with its whole subtree (the fallback). Each unit's path goes into ``paths``."""
    units: list[Unit] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in tracked}
        entry = lookup(module)
        if entry is not None and entry.subtree:
            subtree = {n: p for n, p in module.named_parameters() if id(p) in tracked}
            if subtree:
                units.append(Unit(name, module, entry, subtree))
                covered.append(name)
                paths[units[-1].label] = entry.name
        elif entry is not None and own:
            units.append(Unit(name, module, entry, own))
            paths[units[-1].label] = entry.name
        elif own:
            subtree = {n: p for n, p in module.named_parameters() if id(p) in tracked}
            units.append(Unit(name, module, None, subtree))
            covered.append(name)
            paths[units[-1].label] = "fallback"
            log.info("gradaccum: %s (%s) has no registered statistics; using the exact vmap/loop fallback",
                     units[-1].label, type(module).__name__)
    return units


class Recorder:
    """Hooks that record the calls of an increment's forward (see the module docstring).

    Args:
      model: the model whose own calls are recorded.
      units: the modules whose calls are recorded.
      may_broadcast: whether a call of a forward of ``n`` samples may be broadcast over the
        batch (``_batch.BatchDims.may_broadcast``): only those are looked for in the graph.
    """

    def __init__(self, model: nn.Module, units: list[Unit], may_broadcast: Callable[[Call, int], bool]) -> None:
        self.units = units
        self._may_broadcast = may_broadcast
        self.calls: list[Call] = []
        self.model_calls: list[Call] = []
        self._tapped = 0  # calls whose broadcast output was looked for (``tap_broadcast``)
        self._replaying = False
        self._probe: Sizes | None = None
        self._handles = [u.module.register_forward_hook(self._forward_hook(u), with_kwargs=True) for u in units]
        self._handles.append(model.register_forward_hook(self._model_hook, with_kwargs=True))

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget the calls recorded so far (a new increment)."""
        self.calls = []
        self.model_calls = []
        self._tapped = 0

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No call is recorded inside: a layer or the model run again per sample."""
        before, self._replaying = self._replaying, True
        try:
            yield
        finally:
            self._replaying = before

    @contextlib.contextmanager
    def sizes(self) -> Iterator[Sizes]:
        """Inside, the hooks record only each covered module's batch sizes, into the dict given."""
        self._probe = {}
        try:
            yield self._probe
        finally:
            self._probe = None

    @property
    def forward_passes(self) -> int:
        """Forward passes of the model since the last reset whose outputs reached the loss."""
        return sum(1 for c in self.model_calls if c.reached_loss)

    @property
    def model_call(self) -> Call | None:
        """The model's call this increment's loss came from: the last one whose outputs reached
        it (a forward for monitoring in between, with gradients on, does not count)."""
        reached = [c for c in self.model_calls if c.reached_loss]
        return reached[-1] if reached else (self.model_calls[-1] if self.model_calls else None)

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, unit: Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if self._replaying:
                return
            in_dim, out_dims = batch_dims(module, 1)
            if self._probe is not None:  # the single-sample replay: record sizes only
                self._probe.setdefault(id(module), []).append(
                    (_leading(args, kwargs, in_dim), _leading_out(output, out_dims[0])))
                return
            if not torch.is_grad_enabled():
                return
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    f"per-sample statistics are not defined for BatchNorm in train mode ({unit.label}): it "
                    "normalises over the batch, mixing samples; use GroupNorm/LayerNorm or put it in eval mode"
                )
            call = Call(unit, _detach_all(args), {k: _detach(v) for k, v in kwargs.items()},
                        _leading(args, kwargs, in_dim), _leading_out(output, out_dims[0]))
            call.in_nodes = [a.grad_fn for a in (*args, *kwargs.values())
                             if isinstance(a, torch.Tensor) and a.grad_fn is not None]
            first = next((o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)), None)
            if first is not None:
                call.out_node, call.out_shape = first.grad_fn, tuple(first.shape)
            self._record(call, output)

        return hook

    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._replaying or self._probe is not None or not torch.is_grad_enabled():
            return
        call = Call(None, _detach_all(args), {k: _detach(v) for k, v in kwargs.items()}, _leading(args, kwargs, 0))
        outputs, _ = tree_flatten(output)
        call.batched_outputs = [isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == call.in_size
                                for o in outputs]
        self.model_calls.append(call)
        self._record(call, output, keep=False)
        if call.in_size is not None:
            self.tap_broadcast(self.calls[self._tapped:], call.in_size,
                               [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None])
        self._tapped = len(self.calls)

    def tap_broadcast(self, calls: list[Call], n: int, output_nodes: list[Any]) -> None:
        """For each call of this forward whose output does not carry the batch (a position
        embedding of ``arange(T)``), hook the addition that broadcasts it over the batch: the
        gradient that addition receives, split by sample, is the output's per-sample gradient
        (``_batch.expanded``). Found by walking the autograd graph back from the inputs of the
        calls after it (a few nodes in a transformer), then from the model's outputs."""
        for k, call in enumerate(calls):
            if call.out_node is None or call.unit is None or not self._may_broadcast(call, n):
                continue
            starts = [[node] for later in calls[k + 1:] for node in later.in_nodes] + [output_nodes]
            adds = _consumers(call.out_node, starts)
            if adds is None:
                call.tap_failed = True
                continue
            for node in adds:
                node.register_prehook(_store_broadcast_grad(call))

    def _record(self, call: Call, output: Any, keep: bool = True) -> None:
        outputs, _ = tree_flatten(output)
        call.grads = [None] * len(outputs)
        if keep:
            self.calls.append(call)
        for k, o in enumerate(outputs):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(_store_grad(call, k))


def refuse_compiled(model: nn.Module) -> None:
    """Compiled code runs no module hooks: a compiled module is refused by name."""
    for name, module in model.named_modules():
        compiled = isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or \
            getattr(module, "_compiled_call_impl", None) is not None
        if compiled:
            raise ValueError(
                f"per-sample statistics cannot run on a torch.compile'd module ({name or type(module).__name__}): "
                "compiled code does not run the layer hooks the statistics need. Build the Accumulator on the "
                "uncompiled model, or use a rule without statistics (FixedSteps) with the compiled one")


def _leading(args: tuple, kwargs: dict[str, Any], dim: int) -> int | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return int(v.shape[dim]) if v.dim() > dim else None
    return None


def _leading_out(output: Any, dim: int) -> int | None:
    leaves, _ = tree_flatten(output)
    first = next((o for o in leaves if isinstance(o, torch.Tensor)), None)
    if first is None:
        return None
    return int(first.shape[dim]) if first.dim() > dim else -1


def _consumers(target: Any, starts: list[list[Any]]) -> list[Any] | None:
    """The autograd nodes that take ``target``'s output into a plain addition (``x + pe``),
    found from the first group of ``starts`` whose graph reaches one; None when a node other
    than such an addition takes it (or none is found). Nodes made before ``target`` cannot
    take its output, so the walk stops at them."""
    floor = target._sequence_nr()
    seen: set[int] = set()
    for group in starts:
        found: list[Any] = []
        other = False
        stack = [node for node in group if node is not None]
        while stack:
            node = stack.pop()
            if id(node) in seen or node._sequence_nr() < floor:
                continue
            seen.add(id(node))
            for child, _ in node.next_functions:
                if child is target:
                    if type(node).__name__ == "AddBackward0" and getattr(node, "_saved_alpha", None) == 1:
                        found.append(node)
                    else:
                        other = True
                elif child is not None:
                    stack.append(child)
        if other:
            return None
        if found:
            return found
    return None


def _store_broadcast_grad(call: Call):
    """The pre-hook of the addition a broadcast call's output went into. It holds its call weakly:
    the call holds the graph's nodes (``out_node``), whose hooks the collector cannot see, so a
    strong reference would keep every call, its model and its tensors alive after the graph."""
    ref = weakref.ref(call)

    def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        call = ref()
        g = grad_outputs[0]
        if g is None or call is None:
            return
        g = g.detach()
        if call.broadcast_grad is None:
            call.broadcast_grad = g
        elif call.broadcast_grad.shape == g.shape:
            call.broadcast_grad = call.broadcast_grad + g
        else:
            call.tap_failed = True

    return hook


def _store_grad(call: Call, k: int):
    """The hook on the call's ``k``-th output; it holds its call weakly (``_store_broadcast_grad``)."""
    ref = weakref.ref(call)

    def hook(grad: torch.Tensor) -> None:
        call = ref()
        if call is None:
            return
        prior = call.grads[k]
        call.grads[k] = grad.detach() if prior is None else prior + grad.detach()

    return hook


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _detach_all(args: tuple) -> tuple:
    return tuple(_detach(a) for a in args)
