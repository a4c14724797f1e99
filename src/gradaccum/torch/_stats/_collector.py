"""PerSampleGradStats: per-sample gradient statistics gathered during ordinary backward passes.

The class composes the pieces, one module each: the recorder of calls (``_recorder``), the
batch-dimension decisions (``_batch``), the path each layer's call takes (``_paths``), the
explained-gradient check (``_check``) and the statistic kept over the window (``_statistic``:
``_norms`` or ``_elements``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..._core.moments import Moments
from ..._core.noise_scale import NormSums
from ..._core.rules import KINDS
from ..._core.validation import check_choice, check_positive_int
from ._batch import BatchDims
from ._check import Check
from ._elements import ElementMoments
from ._explained import Projector
from ._increment import Increment
from ._norms import NormSquares
from ._paths import LayerPaths, compute_dtype, count_uses
from ._recorder import Call, Recorder, Unit, find_units, refuse_compiled
from ._sharded import is_sharded, shard_group
from ._statistic import Reduce, Statistic

log = logging.getLogger("gradaccum")
_STATISTICS: dict[str, type[Statistic]] = {"norms": NormSquares, "elements": ElementMoments}


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
      statistics: ``"elements"`` (per-element moments, for GSNR) or ``"norms"`` (the norm path,
        for NormTest and the noise scale: only ``sum_i |g_i|^2`` over the window, a float64
        scalar, from per-sample gradient norms that cost about nothing for ``nn.Linear``;
        ``norm_sums`` combines it with the window's gradient sum). Both are exact and both
        run the same checks.
    """

    def __init__(self, model: nn.Module, *, params: Iterable[nn.Parameter] | None = None,
                 chunk_elements: int = 1 << 24, statistics: str = "elements") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refuse_compiled(model)
        self.params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        if not self.params:
            raise ValueError("model has no trainable parameters: there are no gradients to gather statistics of")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        self.statistics = check_choice("statistics", statistics, KINDS)
        self.model = model
        self.paths: dict[str, str] = {}
        self._index = {id(p): i for i, p in enumerate(self.params)}
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = [names.get(id(p), f"parameter #{i} (not in the model)") for i, p in enumerate(self.params)]
        units = find_units(model, set(self._index), self.paths)
        self._owners = _layer_of_parameters(units, self.params, self._names)
        self._group = self._sharding(units)  # the shards' process group under fully_shard, else None
        self._statistic: Statistic = NormSquares(self.params, self._owners, self._group) if self.statistics == "norms" \
            else ElementMoments(self.params, self._names)
        self._batch = BatchDims(model, self.params)
        self._recorder = Recorder(model, units, self._batch.may_broadcast)
        project = Projector()
        self._check = Check(self.params, project, self._group)
        self._paths = LayerPaths(model, self.params, self._names, self._recorder, self.paths, project,
                                 chunk_elements, self._statistic.norm_formulas)
        self._lengths = [p.shape[-1] if p.dim() >= 2 else 1 for p in self.params]
        self.last_samples = 0  # this process's samples in the last committed increment

    def _sharding(self, units: list[Unit]) -> Any:
        """Under FSDP2 the norm path runs on shards (``_sharded``); what cannot is refused here."""
        if not is_sharded(self.params):
            return None
        _STATISTICS[self.statistics].check_sharded()
        fallback = [u.label for u in units if u.entry is None]
        if fallback:
            raise ValueError(f"{', '.join(fallback)}: no registered statistics, and the per-sample fallback would "
                             "replay the layer on one rank of a fully_shard-ed model; register the layer "
                             "(gradaccum.torch.register_layer_stats) or use a rule without statistics")
        return shard_group(self.params, self._names)

    @property
    def chunk_elements(self) -> int:
        """Bound on the elements of per-sample gradients held at once by the per-sample paths."""
        return self._paths.chunk_elements

    @chunk_elements.setter
    def chunk_elements(self, value: int) -> None:
        self._paths.chunk_elements = value

    def remove(self) -> None:
        """Remove the hooks; the statistics gathered so far stay readable."""
        self._recorder.remove()

    @property
    def forward_passes(self) -> int:
        """Forward passes of the model since the last commit whose outputs reached the loss."""
        return self._recorder.forward_passes

    def discard(self) -> None:
        """Forget the increment recorded since the last ``commit`` (for a skipped micro-batch)."""
        self._recorder.reset()

    # ------------------------------------------------------------------ increments
    def commit(self, sums: list[torch.Tensor | None] | None = None, reduce: Reduce | None = None, *,
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
            self._statistic.refuse_lost()
            if sums is None:
                sums = [p.grad for p in self.params]
            calls = [c for c in self._recorder.calls if c.reached_loss]
            if not calls and all(s is None for s in sums):
                raise ValueError("no layer saw a backward since the last commit: run the increment's backward first")
            if not calls and not self._recorder.model_calls:
                raise ValueError("commit: no forward or backward of the model was seen since the last commit (a "
                                 "second commit for one backward?); each increment is one forward and backward, then "
                                 "one commit")
            n = self._sample_count(samples)
            inc = self._increment(calls, sums, n)
            self.last_samples = n
        finally:
            self._recorder.reset()
        return self._statistic.merge(inc, sums, n, 1.0 if scale is None else float(scale), reduce)

    def commit_empty(self, reduce: Callable[[list[torch.Tensor], int], int]) -> int:
        """Take part in a data-parallel increment for which this process has no samples
        (its micro-batch was skipped): contribute zeros, merge what the others saw
        (elements only: the norm path reduces its scalars at the decision)."""
        self._recorder.reset()
        return self._statistic.merge_empty(reduce)

    def _sample_count(self, samples: int | None) -> int:
        call = self._recorder.model_call
        seen = None if call is None else call.in_size
        if samples is not None:
            return check_positive_int("samples", samples)
        if seen is None:
            raise ValueError("samples: the model's forward was not seen with a tensor input carrying the batch on "
                             "dim 0; pass the increment's sample count (commit(samples=...) or "
                             "Accumulator.backward(..., samples=...))")
        return seen

    def _increment(self, calls: list[Call], sums: list[torch.Tensor | None], n: int) -> Increment:
        """Each parameter's share of the increment from the hooked calls, checked against
        ``sums`` (the real gradients); parameters the hooks do not explain take the
        whole-model fallback."""
        on_model = set(self._paths.on_model)
        for name in self._names:  # the whole-model fallback's entries are this increment's alone
            self.paths.pop(name, None)
        calls = self._batch.expand(calls, n)
        for unit in self._batch.broadcast_units(calls, n, self._recorder, self.paths):
            on_model.update(self._index[id(p)] for p in unit.params.values())
        inc = Increment(self._lengths)
        uses = count_uses(calls)
        for call in calls:
            self._paths.add_call(call, n, inc, uses, on_model)
        self._paths.add_tied(inc)
        self._check.floors(inc, [[self._index[id(p)] for p in unit.params.values()]  # type: ignore[union-attr]
                                 for unit in {id(c.unit): c.unit for c in calls}.values()], n)
        self._explain(inc, sums, n, compute_dtype(calls), on_model)
        return inc

    def _explain(self, inc: Increment, sums: list[torch.Tensor | None], n: int, dtype: torch.dtype,
                 on_model: set[int]) -> None:
        """Check the increment against the real gradients; the parameters it does not explain (and
        those in ``on_model``) take the whole model run again per sample, which must explain them."""
        checked = [i for i, s1 in enumerate(sums) if s1 is not None and i not in on_model]
        unexplained = self._check.unexplained(inc, checked, sums, n, dtype)  # type: ignore[arg-type]
        if unexplained and self._group is not None:
            raise ValueError(
                "per-sample statistics cannot explain the gradient of "
                f"{', '.join(self._names[i] for i in unexplained)} "
                "and the whole-model fallback would replay the model on one rank of a fully_shard-ed model. Is a "
                "weight used outside its module (a tied head through F.linear), a penalty added to the loss, or the "
                "forward random (dropout)? Use a rule without statistics (FixedSteps) for this model")
        if unexplained:
            log.info("gradaccum: the layer hooks do not explain the gradients of %s; using the whole-model fallback",
                     ", ".join(self._names[i] for i in unexplained))
            self._paths.on_model.update(unexplained)
            on_model.update(unexplained)
        needed = sorted(i for i in on_model if sums[i] is not None)
        if not needed:
            return
        self._paths.add_model(needed, n, inc)
        self._check.floors(inc, [needed], n)
        wrong = self._check.unexplained(inc, needed, sums, n, dtype)  # type: ignore[arg-type]
        if wrong:
            raise ValueError(
                f"per-sample statistics cannot explain the gradient of {', '.join(self._names[i] for i in wrong)}: "
                "even the whole model run again per sample does not add up to it. Is it used in the loss "
                "outside the model's forward (a weight penalty: put it in the optimizer's weight_decay instead), "
                "is the forward random (dropout: set p=0 or eval mode), or does a layer mix samples? Use a rule "
                "without statistics (FixedSteps) for this model")

    # ------------------------------------------------------------------ results
    @property
    def count(self) -> int:
        """Samples merged so far."""
        return self._statistic.count

    def moments(self) -> list[Moments]:
        """Running moments per parameter (order of ``params``): an ``ElementStatistics``, which
        carries the fused implementation of the GSNR the core's rules and reports run on them."""
        return self._statistic.moments()

    @property
    def lost(self) -> bool:
        """Whether a commit failed after merging part of its increment (the moments are
        refused until ``reset``)."""
        return self._statistic.lost

    def norm_sums(self, window_sums: list[torch.Tensor | None], scale: float = 1.0) -> NormSums:
        """The norm path's window on this process: its samples, ``sum_i |g_i|^2`` and the
        squared norm of ``window_sums`` (the window's gradient sums, multiplied by ``scale``),
        as ``NormSums`` that add up over processes (``pooled_terms`` makes the estimates)."""
        return self._statistic.norm_sums(window_sums, scale)

    def layer_norm_sums(self, window_sums: list[torch.Tensor | None], scale: float = 1.0) -> dict[str, NormSums]:
        """``norm_sums`` per layer (the module owning each parameter; a parameter used by several
        layers counts for the first): the terms add up over layers to the whole model's, so each
        layer has its own noise scale (Gray et al. 2024 report LayerNorm's tracking the total)."""
        return self._statistic.layer_norm_sums(window_sums, scale)

    @property
    def _norm_totals(self) -> list[float]:
        """The norm path's ``sum_i |g_i|^2`` per parameter so far."""
        return self._statistic.totals  # type: ignore[attr-defined]

    def reset(self) -> None:
        """Start a new window: forget the running moments."""
        self._statistic.reset()
        self._recorder.reset()

    def state_dict(self) -> dict[str, Any]:
        """The running moments (for a checkpoint taken mid-window)."""
        return self._statistic.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s moments (checked against the parameters first)."""
        self._statistic.load(self.check_state(state))
        self._recorder.reset()

    def check_state(self, state: Any) -> list[Moments] | None:
        """The moments ``state`` holds, validated against the parameters; nothing is assigned."""
        return self._statistic.check_state(state)


def _layer_of_parameters(units: list[Unit], params: list[nn.Parameter], names: list[str]) -> list[str]:
    """The layer each parameter counts for: the first unit holding it, else its own name."""
    owner: dict[int, str] = {}
    for unit in units:
        for p in unit.params.values():
            owner.setdefault(id(p), unit.label)
    return [owner.get(id(p), name) for p, name in zip(params, names)]
