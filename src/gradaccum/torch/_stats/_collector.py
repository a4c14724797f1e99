"""PerSampleGradStats: per-sample gradient moments gathered during ordinary backward passes."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..._core.moments import Moments
from ..._core.noise_scale import NormSums
from ..._core.rules import KINDS
from ..._core.validation import check_choice, check_positive_int
from ._explained import Projector, scale_from_squares, unexplained
from ._fallback import BATCHED_KWARGS, Replay, batch_dims, loop_per_sample, vmap_per_sample
from ._blocks import PartialCommit, commit_in_blocks
from ._guard import Values, flag_coefficient
from ._merge import merge_into
from ._registry import LayerStats, RowSquares, channels_last_positions, lookup
from .._distributed import local, sum_over_ranks
from ._sharded import agreed, is_sharded, local_rows, shard_group

log = logging.getLogger("gradaccum")
MODEL = "<model>"  # the label of the whole-model fallback in ``paths``


@dataclass
class _Unit:
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
class _Call:
    unit: _Unit | None  # None: the whole model's call
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
    expanded: bool = False  # a broadcast call rewritten over the batch (``_expanded``)

    @property
    def reached_loss(self) -> bool:
        return any(g is not None for g in self.grads)


@dataclass
class _Increment:
    """What one increment's backward produced, per parameter (order of ``params``)."""

    lengths: list[int]  # each parameter's last-dim length (what the projection runs along; 1 for vectors)
    squares: list[torch.Tensor | RowSquares | None] = field(default_factory=list)  # per-element sums of squares over samples
    hooked: list[torch.Tensor | None] = field(default_factory=list)  # projected sums of the hooked per-sample gradients
    floor: list[Any] = field(default_factory=list)  # the layer's per-element magnitude floor (see _explained)
    norms: list[torch.Tensor | None] = field(default_factory=list)  # norm-path entries: sum_i |g_i|^2 (0-d)
    scales: list[torch.Tensor | None] = field(default_factory=list)  # their projected magnitudes
    terms: list[int | None] = field(default_factory=list)  # their summed terms per element (default: samples)
    tied: dict[int, torch.Tensor] = field(default_factory=dict)  # per-sample gradients summed over calls
    values: list[Values | None] = field(default_factory=list)  # per-sample values at given elements (the guard)

    def __post_init__(self) -> None:
        size = len(self.lengths)
        self.squares, self.hooked, self.norms, self.scales, self.values = (  # type: ignore[assignment]
            [None] * size for _ in range(5))
        self.floor, self.terms = [0.0] * size, [None] * size

    def dense_squares(self, i: int) -> torch.Tensor | None:
        """Parameter i's sums of squares as a tensor (a ``RowSquares`` is made whole, once)."""
        if isinstance(self.squares[i], RowSquares):
            self.squares[i] = self.squares[i].full()  # type: ignore[union-attr]
        return self.squares[i]  # type: ignore[return-value]

    def scale(self, i: int, n: int, project: Projector) -> torch.Tensor | None:
        """Parameter i's projected magnitude bound (before the floor)."""
        if self.scales[i] is not None:
            return self.scales[i]
        squares = self.dense_squares(i)
        return None if squares is None else scale_from_squares(squares, n, project)

    def has_bound(self, i: int) -> bool:
        if self.scales[i] is not None:
            return self.scales[i].numel() > 0  # type: ignore[union-attr]
        return self.squares[i] is not None and math.prod(self.squares[i].shape) > 0  # type: ignore[union-attr]

    def bound_source(self, i: int) -> torch.Tensor:
        """The tensor whose maximum gives parameter i's per-element bound (``element_bound``):
        the layer's magnitudes where it gave them (small), else the sums of squares."""
        return self.scales[i] if self.scales[i] is not None else self.dense_squares(i)  # type: ignore[return-value]

    def element_bound(self, i: int, largest: float, n: int, project: Projector) -> float:
        """The largest per-element magnitude bound of parameter i from ``largest``, the maximum
        of its ``bound_source``: the largest projected row over ``sum|v|``, or ``sqrt(n max S2)``."""
        if self.scales[i] is not None:
            return largest / project.abs_sum(self.lengths[i])
        return math.sqrt(max(largest, 0.0) * n)

    def squared_norm(self, i: int) -> torch.Tensor | None:
        """``sum_i |g_i|^2`` of parameter i over the increment's samples."""
        if self.norms[i] is not None:
            return self.norms[i]
        squares = self.dense_squares(i)
        return None if squares is None else squares.sum()


class PerSampleGradStats:
    """Sum and sum of squares of per-sample gradients, per parameter, across increments.

    Run a backward of the **sum** of per-sample losses (or ``mean * count``) of an
    increment, then call ``commit()``: the increment's count, mean and M2 are merged
    into the running moments with Chan's formula (docs/design.md, "Moments"). Hooks on
    each layer see its input and output gradient; a registry maps layer types to exact
    formulas (``nn.Linear`` on 2-D input needs one extra GEMM and no per-sample
    gradient), and modules no entry covers (recurrent layers, custom ones) take an
    exact per-sample fallback (vmap, else a loop).

    Exact or refused (docs/design.md, "Exact or refused"):

    - the number of samples is the leading size of the model's input (or ``samples=``);
      a layer whose input or output does not carry that many samples on its batch
      dimension (``wpe(arange(T))`` added to a (B, T, C) tensor) is broadcast over the
      batch, and so is one whose sizes do not follow the batch when the model is run
      once more on a single sample (the test that tells ``B == T`` apart);
    - after every backward the hooked per-sample gradients of each parameter must add up
      to its real gradient (checked on cheap projections, ``_explained``); where they do
      not (a weight used outside its module, such as ``F.linear(h, self.wte.weight)``)
      or the layer is broadcast, the parameter's per-sample gradients come from the
      whole model run again per sample (vmap, else a loop). If even that does not
      explain the gradient (a penalty on the weights in the loss, a random forward), the
      commit raises ValueError naming the parameter;
    - statistics are computed in the parameters' dtype, so bfloat16/float16 activations
      under autocast are accumulated in float32; BatchNorm in train mode, sparse
      embeddings and compiled modules raise ValueError naming the layer.

    ``paths`` says which path each layer (and each parameter on the model fallback) took
    in the last increment.

    Args:
      model: the module whose trainable parameters get statistics.
      params: the parameters to keep statistics for, in the order ``moments()`` returns
        them and ``commit(sums)`` takes them (default: the model's trainable parameters);
        matched by identity, so an optimizer's parameter groups in any order work.
      chunk_elements: bound on the elements of per-sample gradients held at once by
        the per-sample paths (the batch is processed in chunks below it).
      kind: ``"elements"`` (per-element moments, for GSNR) or ``"norms"`` (the norm path,
        for NormTest and the noise scale: only ``sum_i |g_i|^2`` over the window, a float64
        scalar, from per-sample gradient norms that cost about nothing for ``nn.Linear``;
        ``norm_sums`` combines it with the window's gradient sum). Both are exact and both
        run the same checks.
    """

    def __init__(self, model: nn.Module, *, params: Iterable[nn.Parameter] | None = None,
                 chunk_elements: int = 1 << 24, kind: str = "elements") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _refuse_compiled(model)
        self.params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        if not self.params:
            raise ValueError("model has no trainable parameters: there are no gradients to gather statistics of")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        self.chunk_elements = chunk_elements
        self.kind = check_choice("kind", kind, KINDS)
        self.model = model
        self.paths: dict[str, str] = {}
        self._index = {id(p): i for i, p in enumerate(self.params)}
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = [names.get(id(p), f"parameter #{i} (not in the model)") for i, p in enumerate(self.params)]
        self._units = self._find_units(model)
        self._group = self._sharding()  # the shards' process group under fully_shard, else None
        self._handles = [u.module.register_forward_hook(self._forward_hook(u), with_kwargs=True) for u in self._units]
        self._handles.append(model.register_forward_hook(self._model_hook, with_kwargs=True))
        self._project = Projector()
        self._batched: dict[int, bool] = {}  # id(module) -> its calls follow the batch (probed once)
        self._on_model: set[int] = set()  # parameters whose statistics come from the whole-model fallback
        self._replaying = False
        self._probe: dict[int, list[tuple[int | None, int | None]]] | None = None
        self._lengths = [p.shape[-1] if p.dim() >= 2 else 1 for p in self.params]
        self._moments: list[Moments] | None = None
        self._lost: str | None = None  # why the moments were lost (``PartialCommit``), until reset
        self._norm_samples = 0  # the norm path's window: samples and, per parameter, sum_i |g_i|^2 (float64)
        self._norm_totals = [0.0] * len(self.params)
        self._owners = self._layer_of_parameters()
        self.last_samples = 0  # this process's samples in the last committed increment
        self._reset_increment()

    # ------------------------------------------------------------------ setup
    def _find_units(self, model: nn.Module) -> list[_Unit]:
        units: list[_Unit] = []
        covered: list[str] = []
        tracked = set(self._index)
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in covered):
                continue
            own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in tracked}
            entry = lookup(module)
            if entry is not None and entry.subtree:
                subtree = {n: p for n, p in module.named_parameters() if id(p) in tracked}
                if subtree:
                    units.append(_Unit(name, module, entry, subtree))
                    covered.append(name)
                    self.paths[units[-1].label] = entry.name
            elif entry is not None and own:
                units.append(_Unit(name, module, entry, own))
                self.paths[units[-1].label] = entry.name
            elif own:
                subtree = {n: p for n, p in module.named_parameters() if id(p) in tracked}
                units.append(_Unit(name, module, None, subtree))
                covered.append(name)
                self.paths[units[-1].label] = "fallback"
                log.info("gradaccum: %s (%s) has no registered statistics; using the exact vmap/loop fallback",
                         units[-1].label, type(module).__name__)
        return units

    def _sharding(self) -> Any:
        """Under FSDP2 the norm path runs on shards (``_sharded``); what cannot is refused here."""
        if not is_sharded(self.params):
            return None
        if self.kind != "norms":
            raise ValueError("kind='elements': per-element moments are not taken on a model sharded with fully_shard "
                             "(each rank would need the moments of its shard from every rank's samples); use the "
                             "norm path (kind='norms': NormTest, the noise-scale planners) or DDP")
        fallback = [u.label for u in self._units if u.entry is None]
        if fallback:
            raise ValueError(f"{', '.join(fallback)}: no registered statistics, and the per-sample fallback would "
                             "replay the layer on one rank of a fully_shard-ed model; register the layer "
                             "(gradaccum.torch.register_layer_stats) or use a rule without statistics")
        return shard_group(self.params, self._names)

    def remove(self) -> None:
        """Remove the hooks; the statistics gathered so far stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, unit: _Unit):
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
            call = _Call(unit, _detach_all(args), {k: _detach(v) for k, v in kwargs.items()},
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
        call = _Call(None, _detach_all(args), {k: _detach(v) for k, v in kwargs.items()}, _leading(args, kwargs, 0))
        outputs, _ = tree_flatten(output)
        call.batched_outputs = [isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == call.in_size
                                for o in outputs]
        self._model_calls.append(call)
        self._record(call, output, keep=False)
        if call.in_size is not None:
            self._tap_broadcast(self._calls[self._tapped:], call.in_size,
                                [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None])
        self._tapped = len(self._calls)

    def _tap_broadcast(self, calls: list[_Call], n: int, output_nodes: list[Any]) -> None:
        """For each call of this forward whose output does not carry the batch (a position
        embedding of ``arange(T)``), hook the addition that broadcasts it over the batch: the
        gradient that addition receives, split by sample, is the output's per-sample gradient
        (``_expanded``). Found by walking the autograd graph back from the inputs of the calls
        after it (a few nodes in a transformer), then from the model's outputs."""
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

    def _may_broadcast(self, call: _Call, n: int) -> bool:
        """Whether the call's sizes, or an earlier probe, say it does not follow the batch."""
        in_dim, _ = batch_dims(call.unit.module, 1)  # type: ignore[union-attr]
        return in_dim == 0 and (call.in_size != n or call.out_size not in (n, None)
                                or self._batched.get(id(call.unit.module)) is False)  # type: ignore[union-attr]

    @property
    def forward_passes(self) -> int:
        """Forward passes of the model since the last commit whose outputs reached the loss."""
        return sum(1 for c in self._model_calls if c.reached_loss)

    @property
    def _model_call(self) -> _Call | None:
        """The model's call this increment's loss came from: the last one whose outputs reached
        it (a forward for monitoring in between, with gradients on, does not count)."""
        reached = [c for c in self._model_calls if c.reached_loss]
        return reached[-1] if reached else (self._model_calls[-1] if self._model_calls else None)

    def _record(self, call: _Call, output: Any, keep: bool = True) -> None:
        outputs, _ = tree_flatten(output)
        call.grads = [None] * len(outputs)
        if keep:
            self._calls.append(call)
        for k, o in enumerate(outputs):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(_store_grad(call, k))

    # ------------------------------------------------------------------ increments
    def _reset_increment(self) -> None:
        self._calls: list[_Call] = []
        self._model_calls: list[_Call] = []
        self._tapped = 0  # calls whose broadcast output was looked for (``_tap_broadcast``)

    def discard(self) -> None:
        """Forget the increment recorded since the last ``commit`` (for a skipped micro-batch)."""
        self._reset_increment()

    def commit(self, sums: list[torch.Tensor | None] | None = None,
               reduce: Callable[[list[torch.Tensor], int], int] | None = None, *,
               samples: int | None = None, scale: float | None = None) -> int:
        """Merge the increment whose backward just ran; returns its sample count.

        On any error the running moments are left as they were, but for one: an exception in
        the merge after part of the increment went in (a registered layer's ``values`` or
        ``RowSquares`` raising, memory running out half-way; ``_blocks``). That raises
        ``PartialCommit`` and the moments are lost: ``moments``, ``state_dict`` and ``commit``
        refuse until ``reset``.

        Args:
          sums: this increment's gradient of the summed loss per parameter (in the order
            of ``params``). By default ``p.grad``, which must then hold this increment only.
          reduce: under data parallelism, sums the increment's gradient sums, sums of
            squares (in place, given copies) and sample count over processes and returns
            the total count, so every process merges the same global increment.
          samples: the number of samples in the increment (default: the leading size of
            the model's first tensor input).
          scale: the loss scale the backward ran with (a GradScaler's), divided out of
            the sums (and its square out of the sums of squares) before merging.
        """
        try:
            self._refuse_lost()
            if sums is None:
                sums = [p.grad for p in self.params]
            calls = [c for c in self._calls if c.reached_loss]
            if not calls and all(s is None for s in sums):
                raise ValueError("no layer saw a backward since the last commit: run the increment's backward first")
            n = self._sample_count(samples)
            inc = self._increment(calls, sums, n)
            self.last_samples = n
        finally:
            self._reset_increment()
        unscale = 1.0 if scale is None else float(scale)
        if self.kind == "norms":
            parts = [inc.squared_norm(i) for i in range(len(self.params))]
            present = [i for i, t in enumerate(parts) if t is not None]
            if present:  # one synchronisation for every parameter
                values = torch.stack([parts[i] for i in present]).to(torch.float64).tolist()  # type: ignore[misc]
                for i, v in zip(present, values):
                    self._norm_totals[i] += v / (unscale * unscale)
            self._norm_samples += n
            return n
        firsts = [torch.zeros_like(p) if s1 is None else s1.detach() for p, s1 in zip(self.params, sums)]
        coefficients = [flag_coefficient(inc.terms[i] or n, p.dtype, n) for i, p in enumerate(self.params)]
        global_ = None if reduce is None else lambda s1, m2s, n_local: self._reduce_moments(reduce, s1, m2s, n_local)
        before = self.count
        try:
            self._moments = commit_in_blocks(self._moments, self.params, firsts, inc.squares, n, coefficients,
                                             inc.values, self._names, unscale, global_)
        except PartialCommit as error:
            self._moments, self._lost = None, str(error)
            raise
        return self.count - before  # the global increment's samples under data parallelism

    @staticmethod
    def _reduce_moments(reduce: Callable[[list[torch.Tensor], int], int], firsts: list[torch.Tensor],
                        m2s: list[torch.Tensor], n_local: int) -> tuple[list[torch.Tensor], int]:
        """The global increment over processes from each one's sum and exact ``M2``: first the
        sums and the count, then ``M2 = sum_r M2_r + (S1_r - n_r S1 / n)^2 / n_r`` (Chan's merge
        over the ranks, no cancellation); ``m2s`` becomes the global one in place. Returns the
        global sums and count."""
        totals = [s1.clone() for s1 in firsts]
        n = reduce(totals, n_local)
        if n_local > 0 and n > 0:
            deviation = torch._foreach_mul(totals, -n_local / n)
            torch._foreach_add_(deviation, firsts)
            torch._foreach_addcmul_(m2s, deviation, deviation, value=1.0 / n_local)
        reduce(m2s, 0)
        return totals, n

    def norm_sums(self, window_sums: list[torch.Tensor | None], scale: float = 1.0) -> NormSums:
        """The norm path's window on this process: its samples, ``sum_i |g_i|^2`` and the
        squared norm of ``window_sums`` (the window's gradient sums, multiplied by ``scale``),
        as ``NormSums`` that add up over processes (``pooled_terms`` makes the estimates)."""
        if self.kind != "norms":
            raise ValueError("norm_sums needs PerSampleGradStats(kind='norms')")
        samples, totals, squared = self._norm_terms(window_sums, scale)
        return NormSums.of(samples, math.fsum(totals), math.fsum(squared))

    def layer_norm_sums(self, window_sums: list[torch.Tensor | None], scale: float = 1.0) -> dict[str, NormSums]:
        """``norm_sums`` per layer (the module owning each parameter; a parameter used by several
        layers counts for the first): the terms add up over layers to the whole model's, so each
        layer has its own noise scale (Gray et al. 2024 report LayerNorm's tracking the total)."""
        if self.kind != "norms":
            raise ValueError("layer_norm_sums needs PerSampleGradStats(kind='norms')")
        samples, totals, squared = self._norm_terms(window_sums, scale)
        layers: dict[str, tuple[list[float], list[float]]] = {}
        for owner, total, sq in zip(self._owners, totals, squared):
            entry = layers.setdefault(owner, ([], []))
            entry[0].append(total)
            entry[1].append(sq)
        return {name: NormSums.of(samples, math.fsum(t), math.fsum(q)) for name, (t, q) in layers.items()}

    def _norm_terms(self, window_sums: list[torch.Tensor | None], scale: float) -> tuple[int, list[float], list[float]]:
        """The window's samples, each parameter's ``sum_i |g_i|^2`` and ``|S1|^2``: this
        process's, or under fully_shard every rank's added up (one all-reduce of scalars), the
        squared norms of the shards adding up to the whole sum's."""
        squared = self._squared_norms(local(window_sums), scale)
        if self._group is None:
            return self._norm_samples, self._norm_totals, squared
        size = len(self.params)
        flat = torch.tensor([float(self._norm_samples), *self._norm_totals, *squared], dtype=torch.float64)
        (flat,) = sum_over_ranks([flat], self._group)
        values = flat.tolist()
        return int(values[0]), values[1:1 + size], values[1 + size:]

    def _squared_norms(self, window_sums: list[torch.Tensor | None], scale: float) -> list[float]:
        """Each parameter's ``|S1|^2`` (0 where it has no sum), read in one synchronisation."""
        present = [i for i, t in enumerate(window_sums) if t is not None]
        out = [0.0] * len(self.params)
        if present:
            norms = torch.stack(torch._foreach_norm([window_sums[i].detach() for i in present]))  # type: ignore[union-attr]
            for i, v in zip(present, norms.to(torch.float64).square().tolist()):
                out[i] = v / (scale * scale)
        return out

    def _layer_of_parameters(self) -> list[str]:
        owner: dict[int, str] = {}
        for unit in self._units:
            for p in unit.params.values():
                owner.setdefault(id(p), unit.label)
        return [owner.get(id(p), name) for p, name in zip(self.params, self._names)]

    def commit_empty(self, reduce: Callable[[list[torch.Tensor], int], int]) -> int:
        """Take part in a data-parallel increment for which this process has no samples
        (its micro-batch was skipped): contribute zeros, merge what the others saw
        (elements only: the norm path reduces its scalars at the decision)."""
        self._reset_increment()
        m2s = [torch.zeros_like(p) for p in self.params]
        firsts, n = self._reduce_moments(reduce, [torch.zeros_like(p) for p in self.params], m2s, 0)
        if n > 0:
            self._moments = merge_into(self._moments, firsts, m2s, n)[0]
        return n

    def _sample_count(self, samples: int | None) -> int:
        seen = None if self._model_call is None else self._model_call.in_size
        if samples is not None:
            return check_positive_int("samples", samples)
        if seen is None:
            raise ValueError("samples: the model's forward was not seen with a tensor input carrying the batch on "
                             "dim 0; pass the increment's sample count (commit(samples=...) or "
                             "Accumulator.backward(..., samples=...))")
        return seen

    def _increment(self, calls: list[_Call], sums: list[torch.Tensor | None], n: int) -> _Increment:
        """Each parameter's share of the increment from the hooked calls, checked against
        ``sums`` (the real gradients); parameters the hooks do not explain take the
        whole-model fallback."""
        on_model = set(self._on_model)
        for name in self._names:  # the whole-model fallback's entries are this increment's alone
            self.paths.pop(name, None)
        # a broadcast call's rewrite over the batch passes the check whatever it is (its per-sample
        # gradients add up to the real one by construction), so only calls known to be broadcast
        # (sizes, or an earlier single-sample probe) take it; an unknown ``B == T`` call is probed
        calls = [(c.broadcast_grad is not None and self._may_broadcast(c, n) and _expanded(c, n)) or c for c in calls]
        for unit in self._broadcast_units(calls, n):
            on_model.update(self._index[id(p)] for p in unit.params.values())
        inc = _Increment(self._lengths)
        uses: dict[int, int] = {}
        for call in calls:
            for p in call.unit.params.values():  # type: ignore[union-attr]
                uses[id(p)] = uses.get(id(p), 0) + 1
        for call in calls:
            self._add_call(call, n, inc, uses, on_model)
        for i, per_sample in inc.tied.items():
            inc.squares[i] = (per_sample * per_sample).sum(0)
            inc.hooked[i] = self._project(per_sample.sum(0))
            inc.values[i] = _gather(per_sample)
        self._set_floors(inc, [[self._index[id(p)] for p in unit.params.values()]  # type: ignore[union-attr]
                               for unit in {id(c.unit): c.unit for c in calls}.values()], n)
        dtype = _compute_dtype(calls)
        unexplained = self._unexplained(inc, [i for i, s1 in enumerate(sums) if s1 is not None and i not in on_model],
                                        sums, n, dtype)  # type: ignore[arg-type]
        if unexplained and self._group is not None:
            raise ValueError(
                f"per-sample statistics cannot explain the gradient of {', '.join(self._names[i] for i in unexplained)} "
                "and the whole-model fallback would replay the model on one rank of a fully_shard-ed model. Is a "
                "weight used outside its module (a tied head through F.linear), a penalty added to the loss, or the "
                "forward random (dropout)? Use a rule without statistics (FixedSteps) for this model")
        if unexplained:
            log.info("gradaccum: the layer hooks do not explain the gradients of %s; using the whole-model fallback",
                     ", ".join(self._names[i] for i in unexplained))
            self._on_model.update(unexplained)
            on_model.update(unexplained)
        needed = sorted(i for i in on_model if sums[i] is not None)
        if needed:
            self._add_model(needed, n, inc)
            self._set_floors(inc, [needed], n)
            wrong = self._unexplained(inc, needed, sums, n, dtype)  # type: ignore[arg-type]
            if wrong:
                raise ValueError(
                    f"per-sample statistics cannot explain the gradient of {', '.join(self._names[i] for i in wrong)}: "
                    "even the whole model run again per sample does not add up to it. Is it used in the loss "
                    "outside the model's forward (a weight penalty: put it in the optimizer's weight_decay instead), "
                    "is the forward random (dropout: set p=0 or eval mode), or does a layer mix samples? Use a rule "
                    "without statistics (FixedSteps) for this model")
        return inc

    def _unexplained(self, inc: _Increment, indices: list[int], sums: list[torch.Tensor], n: int,
                     dtype: torch.dtype) -> list[int]:
        """The parameters among ``indices`` whose gradient (``sums``) the increment does not explain."""
        grads = [sums[i] for i in indices]
        hooked = [inc.hooked[i] for i in indices]
        scales = [inc.scale(i, n, self._project) for i in indices]
        terms = [inc.terms[i] or n for i in indices]
        floors = [inc.floor[i] for i in indices]
        if self._group is None:
            wrong = unexplained(grads, hooked, scales, terms, floors, self._project, dtype)
            return [indices[j] for j in wrong]
        # sharded: every rank's hooked sums and bounds added up, each rank checking its own rows
        present = [j for j in range(len(indices)) if hooked[j] is not None and scales[j] is not None]
        counts = torch.tensor([float(t) for t in terms] + list(map(float, floors)), dtype=torch.float64)
        summed = sum_over_ranks([*(hooked[j] for j in present), *(scales[j] for j in present), counts], self._group)
        for k, j in enumerate(present):
            p = self.params[indices[j]]
            hooked[j] = local_rows(p, summed[k])
            scales[j] = local_rows(p, summed[len(present) + k])
        totals = summed[-1].tolist()
        terms = [int(t) for t in totals[:len(indices)]]
        floors = totals[len(indices):]
        wrong = unexplained(local(grads), hooked, scales, terms, floors, self._project, dtype)  # type: ignore[arg-type]
        return [indices[j] for j in agreed(wrong, len(indices), self._group)]

    def _set_floors(self, inc: _Increment, groups: list[list[int]], n: int) -> None:
        """Each layer's floor for the check: the largest per-element magnitude bound among its
        parameters (see _explained), every group's maxima read in one synchronisation."""
        indices = sorted({i for group in groups for i in group if inc.has_bound(i)})
        if not indices:
            return
        maxima = torch.stack(torch._foreach_max([inc.bound_source(i) for i in indices])).to(torch.float64)
        bound = dict(zip(indices, (inc.element_bound(i, m, n, self._project) for i, m in zip(indices, maxima.tolist()))))
        for group in groups:
            floor = max((bound[i] for i in group if i in bound), default=0.0)
            for i in group:
                inc.floor[i] = max(inc.floor[i], floor)

    # ------------------------------------------------------------------ batch dimension
    def _broadcast_units(self, calls: list[_Call], n: int) -> list[_Unit]:
        """Units with a call that does not carry the increment's samples on its batch dims.

        Sizes that differ from n settle it; where they equal n (``B == T``), the model is
        run once more on one sample, without gradients, and a layer whose sizes stay put
        is broadcast. That probe runs once per layer; its verdict is kept.
        """
        broadcast: dict[int, _Unit] = {}
        unknown = []
        for c in calls:
            unit = c.unit
            if c.expanded:
                continue
            if c.in_size != n or c.out_size not in (n, None) or self._batched.get(id(unit.module)) is False:  # type: ignore[union-attr]
                broadcast[id(unit)] = unit  # type: ignore[assignment]
            elif n > 1 and id(unit.module) not in self._batched:  # type: ignore[union-attr]
                unknown.append(c)
        if unknown:
            seen = self._probe_one_sample(n)
            for c in unknown:
                unit = c.unit
                sizes = seen.get(id(unit.module))  # type: ignore[union-attr]
                if sizes is None:
                    continue  # not called on the probe (data-dependent): sizes decide, asked again next time
                follows = all(a == 1 and b in (1, None) for a, b in sizes)
                self._batched[id(unit.module)] = follows  # type: ignore[union-attr]
                if not follows:
                    broadcast[id(unit)] = unit  # type: ignore[assignment]
        for unit in broadcast.values():
            self.paths[unit.label] = "broadcast -> model"
        return list(broadcast.values())

    def _probe_one_sample(self, n: int) -> dict[int, list[tuple[int | None, int | None]]]:
        call = self._model_call
        if call is None:
            raise ValueError("samples: the model's forward was not seen, so layers that see the batch cannot be told "
                             "from layers broadcast over it; call the model the statistics were built on")
        one = Replay.of_model(self.model, call.args, call.kwargs, [], n)
        args = tuple(a.narrow(0, 0, 1) if d is not None else a for a, d in zip(one.args, one.arg_dims))
        kwargs = {k: v.narrow(0, 0, 1) if one.kwarg_dims[k] is not None else v for k, v in one.kwargs.items()}
        devices = sorted({p.device.index for p in self.params if p.device.type == "cuda"})
        self._probe = {}
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. reentrant checkpointing warns that nothing requires grad
                self.model(*args, **kwargs)
            return self._probe
        except Exception as error:
            raise ValueError(
                f"samples: to tell layers that see the batch from layers broadcast over it, the model is run once "
                f"more on its first sample (every input with leading size {n} cut to 1), and that failed: "
                f"{type(error).__name__}: {error}") from error
        finally:
            self._probe = None

    # ------------------------------------------------------------------ paths
    def _add_call(self, call: _Call, n: int, inc: _Increment, uses: dict[int, int], on_model: set[int]) -> None:
        unit = call.unit
        assert unit is not None
        wanted = {k for k, p in unit.params.items() if p.requires_grad and self._index[id(p)] not in on_model}
        if not wanted:
            return
        dtype = next(iter(unit.params.values())).dtype
        needs_per_sample = {k for k in wanted if uses.get(id(unit.params[k]), 0) > 1}
        d = call.grads[0]
        if unit.entry is None:
            self._count_terms(unit, wanted, inc, n * _positions(None, d))
            self._add_per_sample(unit, self._fallback(unit, call, n, sorted(wanted), dtype), inc, needs_per_sample)
            for k in wanted - needs_per_sample:
                inc.values[self._index[id(unit.params[k])]] = \
                    lambda index, k=k: self._fallback(unit, call, n, [k], dtype)[k].reshape(n, -1)[:, index]
            return
        if d is None:
            return
        d = d.to(dtype)
        args = tuple(_cast(a, dtype) for a in call.args)
        parts = unit.entry.norms(unit.module, args, d, self._project) \
            if self.kind == "norms" and unit.entry.norms and not needs_per_sample else None
        if parts is not None:
            self.paths[unit.label] = f"{unit.entry.name}:norms"
            for k in wanted & set(parts.squared_norms):
                i = self._index[id(unit.params[k])]
                inc.norms[i] = _plus(inc.norms[i], parts.squared_norms[k])
                inc.hooked[i] = _plus(inc.hooked[i], parts.sums[k])
                inc.scales[i] = _plus(inc.scales[i], parts.magnitudes[k])
                inc.terms[i] = (inc.terms[i] or 0) + parts.terms
            return
        self._count_terms(unit, wanted, inc, n * _positions(unit.entry, d))
        fast = unit.entry.sum_squares(unit.module, args, d, self._project) \
            if unit.entry.sum_squares and not needs_per_sample else None
        if fast is not None:
            self.paths[unit.label] = f"{unit.entry.name}:sum_squares"
            squares, sums, magnitudes = (*fast, {}) if len(fast) == 2 else fast
            kwargs = {k: _cast(v, dtype) for k, v in call.kwargs.items()}
            for k in wanted & set(squares):
                i = self._index[id(unit.params[k])]
                inc.squares[i] = _plus(inc.squares[i], squares[k])
                inc.hooked[i] = _plus(inc.hooked[i], sums[k])
                if k in magnitudes:  # one call per parameter here (a parameter used twice takes per-sample gradients)
                    inc.scales[i] = magnitudes[k]
                inc.values[i] = self._registered_values(unit, args, d, kwargs, n, k)
            return
        self.paths[unit.label] = f"{unit.entry.name}:per_sample"
        if unit.entry.subtree and any(g is not None for g in call.grads[1:]):
            raise ValueError(f"{unit.label}: per-sample statistics use only the module's first output; "
                             "its other outputs (attention weights?) must not reach the loss")
        kwargs = {k: _cast(v, dtype) for k, v in call.kwargs.items()}
        for start, per_sample in self._per_sample_chunks(unit, args, d, kwargs, n):
            self._add_per_sample(unit, {k: g for k, g in per_sample.items() if k in wanted}, inc,
                                 needs_per_sample, offset=start, batch=n)
        for k in wanted - needs_per_sample:
            inc.values[self._index[id(unit.params[k])]] = self._registered_values(unit, args, d, kwargs, n, k)

    def _per_sample_chunks(self, unit: _Unit, args: tuple, d: torch.Tensor, kwargs: dict[str, Any], n: int
                           ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """The registered layer's per-sample gradients, in chunks of samples below ``chunk_elements``."""
        assert unit.entry is not None
        numel = sum(p.numel() for p in unit.params.values())
        chunk = max(1, self.chunk_elements // numel)
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            part = tuple(a.narrow(0, start, size) if isinstance(a, torch.Tensor) else a for a in args)
            extra: tuple = ()
            if unit.entry.subtree:
                extra = ({k: v.narrow(0, start, size) if k in BATCHED_KWARGS and isinstance(v, torch.Tensor) else v
                          for k, v in kwargs.items()},)
            self._replaying = True  # an entry may call the module itself (torch.func): its hooks stay quiet
            try:
                yield start, unit.entry.per_sample(unit.module, part, d.narrow(0, start, size), *extra)
            finally:
                self._replaying = False

    def _registered_values(self, unit: _Unit, args: tuple, d: torch.Tensor, kwargs: dict[str, Any], n: int,
                           name: str) -> Values:
        """The precision guard's per-sample values of one parameter of a registered layer's call."""
        entry = unit.entry
        assert entry is not None
        if entry.values is not None and not entry.subtree:
            return lambda index: entry.values(unit.module, args, d, name, index)  # type: ignore[misc]

        def values(index: torch.Tensor) -> torch.Tensor:
            return torch.cat([g[name].reshape(len(g[name]), -1)[:, index]
                              for _, g in self._per_sample_chunks(unit, args, d, kwargs, n)])

        return values

    def _count_terms(self, unit: _Unit, wanted: set[str], inc: _Increment, terms: int) -> None:
        """Autograd adds ``terms`` terms of this call into each element of the wanted parameters."""
        for k in wanted:
            i = self._index[id(unit.params[k])]
            inc.terms[i] = (inc.terms[i] or 0) + terms

    def _fallback(self, unit: _Unit, call: _Call, n: int, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """vmap over samples where it works for this module, else the per-sample loop."""
        replay = Replay.of_layer(unit.module, call.args, call.kwargs, call.grads).cast_to(dtype)
        return self._replay(unit.label, replay, names, n)

    def _replay(self, label: str, replay: Replay, names: list[str], n: int) -> dict[str, torch.Tensor]:
        self._replaying = True
        try:
            if self.paths.get(label) != "loop":
                try:
                    with torch.no_grad():  # torch.func differentiates inside; no outer graph is wanted
                        result = vmap_per_sample(replay, names, n)
                    self.paths[label] = "vmap"
                    return result
                except Exception as error:  # no batching rule, random ops, data-dependent control flow
                    log.info("gradaccum: vmap failed on %s (%s); using the per-sample loop", label, error)
                    self.paths[label] = "loop"
            return loop_per_sample(replay, names, n)
        finally:
            self._replaying = False

    def _add_model(self, needed: list[int], n: int, inc: _Increment) -> None:
        """Per-sample gradients of ``needed`` parameters from the whole model run again per sample."""
        call = self._model_call
        names = {id(p): name for name, p in self.model.named_parameters()}
        missing = [self._names[i] for i in needed if id(self.params[i]) not in names]
        if missing or call is None or not call.reached_loss:
            why = (f"{', '.join(missing)} not in the model" if missing else
                   "the model's forward was not seen (a compiled model runs no hooks)" if call is None else
                   "the model's outputs did not reach the loss")
            raise ValueError(
                f"per-sample statistics cannot explain the gradient of {', '.join(self._names[i] for i in needed)} "
                f"from the layers that used it, and cannot run the whole model per sample instead: {why}")
        local = [names[id(self.params[i])] for i in needed]
        # outputs that do not carry the batch (a mean loss returned beside the logits) cannot be
        # split by sample: the gradient they pass on reaches the batched outputs' hooks as well
        grads = [g if batched else None for g, batched in zip(call.grads, call.batched_outputs)]
        replay = Replay.of_model(self.model, call.args, call.kwargs, grads, n).cast_to(self.params[needed[0]].dtype)
        try:
            per_sample = self._replay(MODEL, replay, local, n)
        except Exception as error:
            raise ValueError(
                f"per-sample statistics cannot explain the gradient of {', '.join(self._names[i] for i in needed)} "
                "from the layers that used it, and running the whole model once per sample failed "
                f"({type(error).__name__}: {error}). Use the parameter inside a module's forward (tie a head as "
                "an nn.Linear whose weight is the embedding's), give position layers per-sample input "
                "(pos.expand(B, -1)), or use a rule without statistics") from error
        for i, name in zip(needed, local):
            g = per_sample[name]
            inc.squares[i] = (g * g).sum(0)
            inc.hooked[i] = self._project(g.sum(0))
            inc.values[i] = _gather(g)
            inc.norms[i] = inc.scales[i] = None  # what the layer paths said is replaced
            inc.terms[i] = max(inc.terms[i] or 0, n * _positions(None, next((g for g in call.grads if g is not None), None)))
            self.paths[self._names[i]] = f"model:{self.paths[MODEL]}"

    def _add_per_sample(self, unit: _Unit, per_sample: dict[str, torch.Tensor], inc: _Increment,
                        needs_per_sample: set[str], offset: int = 0, batch: int | None = None) -> None:
        for k, g in per_sample.items():
            i = self._index[id(unit.params[k])]
            if k in needs_per_sample:  # used more than once: sum per-sample gradients before squaring
                if i not in inc.tied:
                    inc.tied[i] = torch.zeros((batch or len(g)), *g.shape[1:], dtype=g.dtype, device=g.device)
                inc.tied[i][offset:offset + len(g)] += g
            else:
                inc.squares[i] = _plus(inc.squares[i], (g * g).sum(0))
                inc.hooked[i] = _plus(inc.hooked[i], self._project(g.sum(0)))

    # ------------------------------------------------------------------ results
    @property
    def count(self) -> int:
        """Samples merged so far."""
        if self.kind == "norms":
            return self._norm_samples
        return 0 if self._moments is None else self._moments[0].n

    def moments(self) -> list[Moments]:
        """Running moments per parameter (order of ``params``)."""
        if self.kind == "norms":
            raise ValueError("the norm path keeps no per-element moments (kind='norms'): use norm_sums")
        self._refuse_lost()
        if self._moments is None:
            raise ValueError("no increment has been committed yet")
        return list(self._moments)

    @property
    def lost(self) -> bool:
        """Whether a commit failed after merging part of its increment (the moments are
        refused until ``reset``)."""
        return self._lost is not None

    def _refuse_lost(self) -> None:
        if self._lost is not None:
            raise ValueError(f"statistics: {self._lost}")

    def reset(self) -> None:
        """Start a new window: forget the running moments."""
        self._moments, self._lost = None, None
        self._norm_samples, self._norm_totals = 0, [0.0] * len(self.params)
        self._reset_increment()

    def state_dict(self) -> dict[str, Any]:
        """The running moments (for a checkpoint taken mid-window)."""
        if self.kind == "norms":
            return {"norms": (self._norm_samples, list(self._norm_totals))}
        self._refuse_lost()
        if self._moments is None:
            return {"moments": None}
        return {"moments": [(m.n, m.mean.clone(), m.m2.clone()) for m in self._moments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s moments (checked against the parameters first)."""
        checked = self.check_state(state)
        if self.kind == "norms":
            self._norm_samples, self._norm_totals = checked  # type: ignore[misc]
        else:
            self._moments, self._lost = checked, None  # type: ignore[assignment]
        self._reset_increment()

    def check_state(self, state: Any) -> list[Moments] | None:
        """The moments ``state`` holds, validated against the parameters; nothing is assigned."""
        if self.kind == "norms":
            return _check_norm_state(state, len(self.params))
        if not isinstance(state, dict) or "moments" not in state:
            raise ValueError("statistics state must be a dict with 'moments' (from PerSampleGradStats.state_dict())")
        moments = state["moments"]
        if moments is None:
            return None
        if not isinstance(moments, (list, tuple)) or len(moments) != len(self.params):
            raise ValueError(f"statistics state must hold moments of {len(self.params)} parameters")
        out = []
        counts = set()
        for name, p, entry in zip(self._names, self.params, moments):
            n, mean, m2 = entry
            counts.add(n)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"statistics state: sample count must be a positive int, got {n!r}")
            for what, t in (("mean", mean), ("m2", m2)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"statistics state: {what} of {name} must be a tensor of shape {tuple(p.shape)}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"statistics state: {what} of {name} is not finite")
            if bool((m2 < 0).any()):
                raise ValueError(f"statistics state: m2 of {name} has negative entries")
            out.append(Moments(n, mean.detach().to(p.device, p.dtype).clone(), m2.detach().to(p.device, p.dtype).clone()))
        if len(counts) != 1:
            raise ValueError("statistics state: every parameter's moments must cover the same samples")
        return out


def _check_norm_state(state: Any, size: int) -> tuple[int, list[float]]:
    if not isinstance(state, dict) or "norms" not in state:
        raise ValueError("statistics state must be a dict with 'norms' (from PerSampleGradStats(kind='norms').state_dict())")
    entry = state["norms"]
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise ValueError("statistics state: 'norms' must be (samples, per-parameter sums of squared norms)")
    n, totals = entry
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"statistics state: the norm path's sample count must be an int >= 0, got {n!r}")
    if not isinstance(totals, (list, tuple)) or len(totals) != size:
        raise ValueError(f"statistics state: the sums of squared norms must be a list of {size} floats (one per "
                         f"parameter), got {type(totals).__name__}")
    for total in totals:
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 <= total < math.inf:
            raise ValueError(f"statistics state: a sum of squared norms must be a finite float >= 0, got {total!r}")
    return n, [float(t) for t in totals]


def _refuse_compiled(model: nn.Module) -> None:
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


def _store_broadcast_grad(call: _Call):
    def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        g = grad_outputs[0]
        if g is None:
            return
        g = g.detach()
        if call.broadcast_grad is None:
            call.broadcast_grad = g
        elif call.broadcast_grad.shape == g.shape:
            call.broadcast_grad = call.broadcast_grad + g
        else:
            call.tap_failed = True

    return hook


def _expanded(call: _Call, n: int) -> _Call | None:
    """A broadcast call rewritten as a call over the batch, or None where it cannot be.

    A layer called on inputs shared by every sample (``wpe(arange(T))``, shape ``(T, C)`` or
    ``(1, T, C)``) whose output is added into a tensor of shape ``(n, T, C)`` has, for sample
    ``i``, the per-sample gradient of the same layer called on the same inputs with output
    gradient ``g[i]``, where ``g`` is the gradient the addition received. So the call is the
    layer run on its inputs repeated over a batch of ``n`` with output gradient ``g``: every
    registered formula and fallback then applies, and the check against the real gradient
    still decides (exact or refused)."""
    g = call.broadcast_grad
    if g is None or call.tap_failed or call.out_shape is None or len(call.grads) != 1 or g.dim() < 1 \
            or g.shape[0] != n or any(isinstance(v, torch.Tensor) for v in call.kwargs.values()):
        return None
    rest, shape = tuple(g.shape[1:]), call.out_shape
    if shape == rest:  # no batch dimension: one is added
        args = tuple(a.unsqueeze(0).expand(n, *a.shape) if isinstance(a, torch.Tensor) else a for a in call.args)
    elif len(shape) == len(g.shape) and shape[0] == 1 and shape[1:] == rest:  # a batch dimension of 1
        if any(isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != 1) for a in call.args):
            return None
        args = tuple(a.expand(n, *a.shape[1:]) if isinstance(a, torch.Tensor) else a for a in call.args)
    else:
        return None
    return _Call(call.unit, args, call.kwargs, n, n, [g], expanded=True)


def _store_grad(call: _Call, k: int):
    def hook(grad: torch.Tensor) -> None:
        call.grads[k] = grad.detach() if call.grads[k] is None else call.grads[k] + grad.detach()

    return hook


def _positions(entry: LayerStats | None, d: torch.Tensor | None) -> int:
    """Positions per sample a layer's gradient sums over (see ``LayerStats.positions``)."""
    if d is None:
        return 1
    return max(1, (entry.positions if entry is not None and entry.positions else channels_last_positions)(d))


def _compute_dtype(calls: list[_Call]) -> torch.dtype:
    """The least precise floating dtype among the recorded inputs and output gradients."""
    dtypes = [t.dtype for c in calls for t in (*c.args, *c.grads) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float64)


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _detach_all(args: tuple) -> tuple:
    return tuple(_detach(a) for a in args)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _gather(per_sample: torch.Tensor) -> Values:
    """Per-sample values at flat element indices from per-sample gradients at hand."""
    return lambda index: per_sample.reshape(len(per_sample), -1)[:, index]


def _plus(a: Any, b: Any) -> Any:
    """``a + b``, ``b`` where ``a`` is None (a ``RowSquares`` made whole to be added)."""
    if a is None:
        return b
    return (a.full() if isinstance(a, RowSquares) else a) + (b.full() if isinstance(b, RowSquares) else b)

