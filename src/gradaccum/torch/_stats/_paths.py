"""The path each recorded call takes to its parameters' share of an increment.

A registered layer gives, in order of preference, its norm formula (the norm path needs only
``sum_i |g_i|^2``), its sums of squares in closed form (``nn.Linear``: one extra GEMM at one
position per sample, products made a block of rows at a time over positions) unless per-sample
gradients cost no more and fit ``_choice.BUDGET``, or its per-sample gradients in
chunks of samples; a module no entry covers takes
the per-sample fallback (vmap, else a loop). A parameter used by several calls takes
per-sample gradients from each, summed per sample before they are squared (``Increment.tied``).
Parameters the hooks do not explain take the whole model run again per sample (``add_model``).
``paths`` records, per layer (and per parameter on the model fallback), which path ran.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._choice import per_sample_is_cheaper
from ._explained import Projector
from ._fallback import BATCHED_KWARGS, Replay, loop_per_sample, vmap_per_sample
from ._guard import Values
from ._increment import Increment, gather, plus, positions, sum_of_squares
from ._recorder import Call, Recorder, Unit

log = logging.getLogger("gradaccum")
MODEL = "<model>"  # the label of the whole-model fallback in ``paths``
KEEP_VALUES = 1 << 16  # elements of a parameter's per-sample gradients held for the guard rather than made again


class LayerPaths:
    """Fills an ``Increment`` from the recorded calls, one path per layer.

    Args:
      model: the model, run again per sample by the whole-model fallback.
      params, names: the parameters (the increment's order) and their names.
      recorder: the calls' recorder (quiet while a layer or the model runs again).
      paths: where the path each layer took is written.
      project: the projection of the hooked sums (``_explained``).
      chunk_elements: bound on the elements of per-sample gradients held at once.
      norm_formulas: whether a layer's norm formula serves (the statistic needs only norms).
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], names: list[str], recorder: Recorder,
                 paths: dict[str, str], project: Projector, chunk_elements: int, norm_formulas: bool) -> None:
        self._model = model
        self._params = params
        self._index = {id(p): i for i, p in enumerate(params)}
        self._names = names
        self._recorder = recorder
        self._paths = paths
        self._project = project
        self.chunk_elements = chunk_elements
        self._norm_formulas = norm_formulas
        self.on_model: set[int] = set()  # parameters whose statistics come from the whole-model fallback

    def add_call(self, call: Call, n: int, inc: Increment, uses: dict[int, int], on_model: set[int]) -> None:
        """The call's share of its parameters' entries, except for those in ``on_model``;
        ``uses``: how many calls used each parameter (by id)."""
        unit = call.unit
        assert unit is not None
        wanted = {k for k, p in unit.params.items() if p.requires_grad and self._index[id(p)] not in on_model}
        if not wanted:
            return
        dtype = next(iter(unit.params.values())).dtype
        needs_per_sample = {k for k in wanted if uses.get(id(unit.params[k]), 0) > 1}
        d = call.grads[0]
        if unit.entry is None:
            self._count_terms(unit, wanted, inc, n * positions(None, d))
            self._add_per_sample(unit, self._fallback(unit, call, n, sorted(wanted), dtype), inc, needs_per_sample)
            for k in wanted - needs_per_sample:
                inc.values[self._index[id(unit.params[k])]] = self._fallback_values(unit, call, n, k, dtype)
            return
        if d is None:
            return
        d = d.to(dtype)
        args = tuple(_cast(a, dtype) for a in call.args)
        if self._norm_formulas and unit.entry.norms and not needs_per_sample and \
                self._add_norms(unit, args, d, wanted, inc):
            return
        self._count_terms(unit, wanted, inc, n * positions(unit.entry, d))
        kwargs = {k: _cast(v, dtype) for k, v in call.kwargs.items()}
        if unit.entry.sum_squares and not needs_per_sample and \
                not per_sample_is_cheaper(unit.entry.name, args, d) and \
                self._add_sum_squares(unit, args, d, kwargs, n, wanted, inc):
            return
        self._paths[unit.label] = f"{unit.entry.name}:per_sample"
        if unit.entry.subtree and any(g is not None for g in call.grads[1:]):
            raise ValueError(f"{unit.label}: per-sample statistics use only the module's first output; "
                             "its other outputs (attention weights?) must not reach the loss")
        kept: dict[str, torch.Tensor] = {}
        for start, per_sample in self._per_sample_chunks(unit, args, d, kwargs, n):
            mine = {k: g for k, g in per_sample.items() if k in wanted}
            self._add_per_sample(unit, mine, inc, needs_per_sample, offset=start, batch=n)
            kept = _small_whole(mine, n, unit.entry.values is None or unit.entry.subtree)
        for k in wanted - needs_per_sample:
            i = self._index[id(unit.params[k])]
            inc.values[i] = gather(kept[k]) if k in kept else self._registered_values(unit, args, d, kwargs, n, k)

    def add_tied(self, inc: Increment) -> None:
        """The entries of parameters used by several calls, from their summed per-sample gradients."""
        for i, per_sample in inc.tied.items():
            inc.squares[i] = sum_of_squares(per_sample)
            inc.hooked[i] = self._project(per_sample.sum(0))
            inc.values[i] = gather(per_sample)

    def add_model(self, needed: list[int], n: int, inc: Increment) -> None:
        """Per-sample gradients of ``needed`` parameters from the whole model run again per sample."""
        call = self._recorder.model_call
        names = {id(p): name for name, p in self._model.named_parameters()}
        missing = [self._names[i] for i in needed if id(self._params[i]) not in names]
        if missing or call is None or not call.reached_loss:
            why = (f"{', '.join(missing)} not in the model" if missing else
                   "the model's forward was not seen (a compiled model runs no hooks)" if call is None else
                   "the model's outputs did not reach the loss")
            raise ValueError(
                f"per-sample statistics cannot explain the gradient of {', '.join(self._names[i] for i in needed)} "
                f"from the layers that used it, and cannot run the whole model per sample instead: {why}")
        local = [names[id(self._params[i])] for i in needed]
        # outputs that do not carry the batch (a mean loss returned beside the logits) cannot be
        # split by sample: the gradient they pass on reaches the batched outputs' hooks as well
        grads = [g if batched else None for g, batched in zip(call.grads, call.batched_outputs)]
        replay = Replay.of_model(self._model, call.args, call.kwargs, grads, n).cast_to(self._params[needed[0]].dtype)
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
            inc.squares[i] = sum_of_squares(g)
            inc.hooked[i] = self._project(g.sum(0))
            inc.values[i] = gather(g)
            inc.norms[i] = inc.scales[i] = None  # what the layer paths said is replaced
            first_grad = next((g for g in call.grads if g is not None), None)
            inc.terms[i] = max(inc.terms[i] or 0, n * positions(None, first_grad))
            self._paths[self._names[i]] = f"model:{self._paths[MODEL]}"

    # ------------------------------------------------------------------ registered layers
    def _add_norms(self, unit: Unit, args: tuple, d: torch.Tensor, wanted: set[str], inc: Increment) -> bool:
        """The layer's norm formula (``LayerStats.norms``); False where it gave none for this call."""
        entry = unit.entry
        assert entry is not None and entry.norms is not None  # add_call takes this path only then
        parts = entry.norms(unit.module, args, d, self._project)
        if parts is None:
            return False
        self._paths[unit.label] = f"{entry.name}:norms"
        for k in wanted & set(parts.squared_norms):
            i = self._index[id(unit.params[k])]
            inc.norms[i] = plus(inc.norms[i], parts.squared_norms[k])
            inc.hooked[i] = plus(inc.hooked[i], parts.sums[k])
            inc.scales[i] = plus(inc.scales[i], parts.magnitudes[k])
            inc.add_terms(i, parts.terms)
        return True

    def _add_sum_squares(self, unit: Unit, args: tuple, d: torch.Tensor, kwargs: dict[str, Any], n: int,
                         wanted: set[str], inc: Increment) -> bool:
        """The layer's sums of squares (``LayerStats.sum_squares``); False where it gave none."""
        entry = unit.entry
        assert entry is not None and entry.sum_squares is not None  # add_call takes this path only then
        fast = entry.sum_squares(unit.module, args, d, self._project)
        if fast is None:
            return False
        self._paths[unit.label] = f"{entry.name}:sum_squares"
        squares, sums, magnitudes = (*fast, {}) if len(fast) == 2 else fast
        for k in wanted & set(squares):
            i = self._index[id(unit.params[k])]
            inc.squares[i] = plus(inc.squares[i], squares[k])
            inc.hooked[i] = plus(inc.hooked[i], sums[k])
            if k in magnitudes:  # one call per parameter here (a parameter used twice takes per-sample gradients)
                inc.scales[i] = magnitudes[k]
            inc.values[i] = self._registered_values(unit, args, d, kwargs, n, k)
        return True

    def _per_sample_chunks(self, unit: Unit, args: tuple, d: torch.Tensor, kwargs: dict[str, Any], n: int
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
            with self._recorder.quiet():  # an entry may call the module itself (torch.func): its hooks stay quiet
                yield start, unit.entry.per_sample(unit.module, part, d.narrow(0, start, size), *extra)

    def _registered_values(self, unit: Unit, args: tuple, d: torch.Tensor, kwargs: dict[str, Any], n: int,
                           name: str) -> Values:
        """The precision guard's per-sample values of one parameter of a registered layer's call."""
        entry = unit.entry
        assert entry is not None
        registered = entry.values
        if registered is not None and not entry.subtree:
            return lambda index: registered(unit.module, args, d, name, index)

        def values(index: torch.Tensor) -> torch.Tensor:
            return torch.cat([g[name].reshape(len(g[name]), -1).index_select(1, index)
                              for _, g in self._per_sample_chunks(unit, args, d, kwargs, n)])

        return values

    # ------------------------------------------------------------------ per-sample gradients
    def _count_terms(self, unit: Unit, wanted: set[str], inc: Increment, terms: int) -> None:
        """Autograd adds ``terms`` terms of this call into each element of the wanted parameters."""
        for k in wanted:
            inc.add_terms(self._index[id(unit.params[k])], terms)

    def _add_per_sample(self, unit: Unit, per_sample: dict[str, torch.Tensor], inc: Increment,
                        needs_per_sample: set[str], offset: int = 0, batch: int | None = None) -> None:
        for k, g in per_sample.items():
            i = self._index[id(unit.params[k])]
            if k in needs_per_sample:  # used more than once: sum per-sample gradients before squaring
                inc.add_tied(i, g, offset, batch or len(g))
            else:
                inc.add_squares(i, g, self._project)

    def _fallback_values(self, unit: Unit, call: Call, n: int, name: str, dtype: torch.dtype) -> Values:
        """The precision guard's per-sample values of one parameter, from the exact fallback run
        again for that parameter alone when the guard asks."""

        def values(index: torch.Tensor) -> torch.Tensor:
            return self._fallback(unit, call, n, [name], dtype)[name].reshape(n, -1).index_select(1, index)

        return values

    def _fallback(self, unit: Unit, call: Call, n: int, names: list[str],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """vmap over samples where it works for this module, else the per-sample loop."""
        replay = Replay.of_layer(unit.module, call.args, call.kwargs, call.grads).cast_to(dtype)
        return self._replay(unit.label, replay, names, n)

    def _replay(self, label: str, replay: Replay, names: list[str], n: int) -> dict[str, torch.Tensor]:
        with self._recorder.quiet():
            if self._paths.get(label) != "loop":
                try:
                    with torch.no_grad():  # torch.func differentiates inside; no outer graph is wanted
                        result = vmap_per_sample(replay, names, n)
                    self._paths[label] = "vmap"
                    return result
                except Exception as error:  # no batching rule, random ops, data-dependent control flow
                    log.info("gradaccum: vmap failed on %s (%s); using the per-sample loop", label, error)
                    self._paths[label] = "loop"
            return loop_per_sample(replay, names, n)


def _small_whole(per_sample: dict[str, torch.Tensor], n: int, recomputed: bool) -> dict[str, torch.Tensor]:
    """The per-sample gradients the precision guard reads as they are instead of making them again:
    those of a layer without a registered ``values`` (its per-sample path would run again per
    parameter flagged), made for all ``n`` samples at once and of at most ``KEEP_VALUES`` elements
    (a LayerNorm's: a few thousand, held until the commit)."""
    if not recomputed:
        return {}
    return {k: g for k, g in per_sample.items() if len(g) == n and g.numel() <= KEEP_VALUES}


def count_uses(calls: list[Call]) -> dict[int, int]:
    """How many of the calls used each parameter (by id)."""
    uses: dict[int, int] = {}
    for call in calls:
        assert call.unit is not None  # the recorded layer calls: the model's own call is kept apart
        for p in call.unit.params.values():
            uses[id(p)] = uses.get(id(p), 0) + 1
    return uses


def compute_dtype(calls: list[Call]) -> torch.dtype:
    """The least precise floating dtype among the recorded inputs and output gradients."""
    dtypes = [t.dtype for c in calls for t in (*c.args, *c.grads)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float64)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
