"""Where a statistics rule's numbers come from: one object per source, held by the Accumulator.

- ``PerSampleSource``: per-sample gradients from layer hooks (``PerSampleGradStats``): per-element
  moments or per-sample norms, a variance from a single micro-batch.
- ``MicroBatchSource``: each micro-batch's own gradient. After each micro-batch's backward the
  finiteness check takes every parameter's squared gradient norm (``squared_norms_if_finite``,
  the pass it makes anyway); this source keeps ``sum_j |S_j|^2 / b_j`` per parameter, which with
  the window sum's squared norm gives the unbiased ``tr(Sigma)`` and ``|G|^2``
  (``_core.micro_batch``), for the model and per layer. No hooks: any model, compiled or not,
  with dropout (its noise is part of the gradient's) or not, any layer. For a per-element rule
  (``statistics="elements"``) it keeps instead each element's between-micro-batch ``M2`` (one
  parameter-sized buffer, Chan's update against the window sum before each micro-batch's add)
  and hands the rules ``element_moments``; on one process only.

Both answer the same calls (``measure``, ``norm_sums``, ``layer_norm_sums``, ``reset``,
``discard``, the state), so the Accumulator's backward reads the same whatever the source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._core.micro_batch import MicroBatchSums, element_moments, merge_micro_batch
from .._core.moments import Moments
from .._core.noise_scale import NormSums
from ._distributed import local, sum_over_ranks
from ._nonfinite import squared_norms
from ._stats import PerSampleGradStats

Reduce = Callable[[list[torch.Tensor], int], int]


class PerSampleSource:
    """Per-sample statistics (``PerSampleGradStats``, its hooks on the model)."""

    takes_norms = False  # the finiteness check need not take squared norms for it

    def __init__(self, stats: PerSampleGradStats) -> None:
        self.stats = stats

    @property
    def statistics(self) -> str:
        """What rules read: ``"norms"`` or ``"elements"`` (``PerSampleGradStats.statistics``)."""
        return self.stats.statistics

    @property
    def count(self) -> int:
        return self.stats.count

    @property
    def lost(self) -> bool:
        return self.stats.lost

    def reset(self) -> None:
        self.stats.reset()

    def discard(self) -> None:
        self.stats.discard()

    def measure(self, grads: list[torch.Tensor | None], squared: list[float] | None, samples: int | None,
                count: int, scale: float, reduce: Reduce | None) -> int:
        """Commit the micro-batch's per-sample statistics; its samples (global under DDP for
        per-element moments)."""
        self.stats.commit(grads, reduce=reduce, samples=samples, scale=scale)
        return self.stats.last_samples

    def moments(self) -> list[Moments]:
        """The per-element moments of the window's samples (kind ``"elements"``)."""
        return self.stats.moments()

    def norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> NormSums:
        return self.stats.norm_sums(window_sums, scale)

    def layer_norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> dict[str, NormSums]:
        return self.stats.layer_norm_sums(window_sums, scale)

    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()

    def check_state(self, state: Any) -> Any:
        return self.stats.check_state(state)

    def is_empty(self, checked: Any) -> bool:
        """Whether a checked state holds no samples."""
        return checked is None or (self.statistics == "norms" and checked[0] == 0)

    def load_state_dict(self, state: Any) -> None:
        self.stats.load_state_dict(state)


class MicroBatchSource:
    """The micro-batch source: per-parameter ``sum_j |S_j|^2 / b_j`` over the window's micro-batches
    (``statistics="norms"``), or each element's between-micro-batch ``M2`` (``statistics="elements"``).

    Args:
      names: each tracked parameter's name, in the Accumulator's order (a parameter's layer is
        its name's prefix).
      group: under FSDP2, the process group the gradients are sharded over: each micro-batch's
        squared norms and samples are summed over it (the shards' squares add up to the
        whole gradient's); None otherwise.
      statistics: ``"norms"`` (norm rules and planners) or ``"elements"`` (per-element rules: one
        process only; ``bind_window`` gives it the window's sums).
    """

    lost = False

    def __init__(self, names: list[str], group: Any = None, statistics: str = "norms") -> None:
        if statistics == "elements" and group is not None:
            raise ValueError("source='micro_batch': per-element statistics are taken on one process only")
        self.names = names
        self.layers = [name.rpartition(".")[0] or name for name in names]
        self.group = group
        self.statistics = statistics  # what rules read: NormStatistics or per-element Moments
        self.takes_norms = statistics == "norms"  # the finiteness check takes the squared norms for it
        self._window: Callable[[], list[torch.Tensor | None]] | None = None
        self._params: list[torch.nn.Parameter] = []
        self.reset()

    def bind_window(self, sums: Callable[[], list[torch.Tensor | None]], params: list[torch.nn.Parameter]) -> None:
        """Where the window's gradient sums are read (per-element ``M2``): at ``measure`` they
        are the sums *before* the micro-batch's add, as Chan's update needs. ``params``: the
        tracked parameters (a parameter no gradient reached has moments of zeros, as on the
        per-sample path)."""
        self._window = sums
        self._params = params

    def reset(self) -> None:
        self.micro_batches = 0
        self.samples = 0
        self.weighted = [0.0] * len(self.names)
        self._last: tuple[Any, list[float]] | None = None  # the window sums' squared norms, by their state
        # per element: M2 of the sums as the window holds them (times ``m2_scale``, so M2 times its square)
        self.m2: list[torch.Tensor | None] = [None] * len(self.names)
        self.m2_scale = 1.0

    def discard(self) -> None:
        """Nothing is kept between a micro-batch's backward and its ``measure``."""

    @property
    def count(self) -> int:
        """Samples measured in the open window (on this process)."""
        return self.samples

    def measure(self, grads: list[torch.Tensor | None], squared: list[float] | None, samples: int | None,
                count: int, scale: float, reduce: Reduce | None) -> int:
        """One micro-batch whose gradient sums (times ``scale``: the window's power-of-two count
        shift and a GradScaler's scale) have the squared norms ``squared`` (taken by the
        finiteness check), over ``samples`` samples (default: its ``count`` items). Returns the
        samples measured."""
        b = count if samples is None else samples
        if self.statistics == "elements":
            self._merge(grads, b, scale)
            self.micro_batches += 1
            self.samples += b
            return b
        if squared is None:  # the finiteness check did not run (a GradScaler screens the loss only)
            squared = [0.0 if g is None else float(torch.linalg.vector_norm(g.detach().to(torch.float64)) ** 2)
                       for g in local(grads)]
        if self.group is not None:
            totals = sum_over_ranks([torch.tensor([float(b), *squared], dtype=torch.float64)], self.group)[0].tolist()
            b, squared = int(totals[0]), totals[1:]
        factor = 1.0 / (scale * scale * b)
        self.weighted = [w + s * factor for w, s in zip(self.weighted, squared)]
        self.micro_batches += 1
        self.samples += b
        return b

    def _merge(self, grads: list[torch.Tensor | None], samples: int, scale: float) -> None:
        """Chan's update of each element's ``M2`` with the micro-batch (``merge_micro_batch``),
        against the window's sums before its add; a parameter this micro-batch (or the window so
        far) did not reach counts as a gradient of zeros. ``M2`` is kept on the sums' scale; a
        scale that changed since the window's last micro-batch (a power of two) rescales it first.
        Made whole before anything is assigned."""
        assert self._window is not None, "bind_window() gives the source the window's sums"
        window = self._window()
        rescale = (scale / self.m2_scale) ** 2
        merged: list[torch.Tensor | None] = []
        for m2, total, g in zip(self.m2, window, grads):
            if g is None and total is None:
                merged.append(m2)
                continue
            like = (g if g is not None else total).detach()  # type: ignore[union-attr]
            before = torch.zeros_like(like) if m2 is None else m2 * rescale if rescale != 1.0 else m2
            merged.append(merge_micro_batch(before, torch.zeros_like(like) if total is None else total.detach(),
                                            self.samples, torch.zeros_like(like) if g is None else g.detach(),
                                            samples))
        self.m2, self.m2_scale = merged, scale

    def moments(self) -> list[Moments]:
        """The per-element ``Moments`` the rules read (``element_moments``): the window's mean
        and ``M2`` without the sums' scale, NaN variance below two micro-batches."""
        assert self._window is not None, "bind_window() gives the source the window's sums"
        k, n, c = self.micro_batches, self.samples, self.m2_scale
        out = []
        for p_sum, m2, p in zip(self._window(), self.m2, self._params):
            total = torch.zeros_like(p.detach()) if p_sum is None else p_sum.detach() / c
            out.append(element_moments(k, n, total, torch.zeros_like(total) if m2 is None else m2 / (c * c)))
        return out

    def _window_squared(self, window_sums: list[torch.Tensor | None], scale: float) -> list[float]:
        """Each parameter's ``|S|^2`` of the window's sum (summed over the shards under FSDP2);
        one pass per state of the sums (the close reads it for the model and for its layers). The
        state is the micro-batches measured and each sum's identity and version: an add into a
        DTensor (FSDP2) leaves the versions of the DTensor and of its shard as they were."""
        key = (scale, self.micro_batches, self.samples,
               tuple(None if s is None else (id(s), s._version) for s in window_sums))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        squared = self._measure_window(window_sums, scale)
        self._last = (key, squared)
        return squared

    def _measure_window(self, window_sums: list[torch.Tensor | None], scale: float) -> list[float]:
        present = [(i, s) for i, s in enumerate(local(window_sums)) if s is not None]
        out = [0.0] * len(self.names)
        if present:
            for (i, _), v in zip(present, squared_norms([s for _, s in present])):
                out[i] = v / (scale * scale)
        if self.group is not None:
            out = sum_over_ranks([torch.tensor(out, dtype=torch.float64)], self.group)[0].tolist()
        return out

    def norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> NormSums:
        """The model's ``NormSums`` with the micro-batches as groups (``pooled_terms`` makes the
        unbiased estimates; they add up over DDP ranks)."""
        squared = self._window_squared(window_sums, scale)
        return MicroBatchSums(self.micro_batches, self.samples, math.fsum(self.weighted)).norm_sums(math.fsum(squared))

    def layer_norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> dict[str, NormSums]:
        """``norm_sums`` per layer (the module holding each parameter): they add up to the model's."""
        return self._by_layer(self.micro_batches, self.samples, self.weighted,
                              self._window_squared(window_sums, scale))

    def global_norm_sums(self, reduced_sums: list[torch.Tensor | None], scale: float,
                         all_reduce: Callable[[list[torch.Tensor]], None]) -> tuple[NormSums, dict[str, NormSums]]:
        """The model's and each layer's norm sums over every rank's micro-batches, as one process
        over all of them would measure them: under DDP each rank's micro-batches are micro-batches
        of the one window, whose sum ``reduced_sums`` is (after the close's all-reduce, the same on
        every rank). ``all_reduce`` sums one small float64 tensor over the ranks in place: the
        micro-batches, their samples and each parameter's ``sum_j |S_j|^2 / b_j``."""
        present = [s for s in local(reduced_sums) if s is not None]
        device = present[0].device if present else torch.device("cpu")
        totals = torch.tensor([float(self.micro_batches), float(self.samples), *self.weighted], dtype=torch.float64,
                              device=device)
        all_reduce([totals])
        values = totals.tolist()
        k, n, weighted = int(values[0]), int(values[1]), values[2:]
        squared = self._window_squared(reduced_sums, scale)
        return (MicroBatchSums(k, n, math.fsum(weighted)).norm_sums(math.fsum(squared)),
                self._by_layer(k, n, weighted, squared))

    def _by_layer(self, k: int, n: int, weighted: list[float], squared: list[float]) -> dict[str, NormSums]:
        grouped: dict[str, tuple[list[float], list[float]]] = {}
        for layer, w, s in zip(self.layers, weighted, squared):
            entry = grouped.setdefault(layer, ([], []))
            entry[0].append(w)
            entry[1].append(s)
        return {layer: MicroBatchSums(k, n, math.fsum(w)).norm_sums(math.fsum(s)) for layer, (w, s) in grouped.items()}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"micro_batch": (self.micro_batches, self.samples, list(self.weighted))}
        if self.statistics == "elements":
            state["m2"] = [None if m is None else m.clone() for m in self.m2]
            state["m2_scale"] = self.m2_scale
        return state

    def check_state(self, state: Any) -> tuple[Any, ...]:
        """The window ``state`` holds, validated (nothing is assigned)."""
        if not isinstance(state, dict) or "micro_batch" not in state:
            raise ValueError("statistics state must be a dict with 'micro_batch' (saved with source='micro_batch'); "
                             "build the Accumulator with the rule's source the state was saved with")
        if (self.statistics == "elements") != ("m2" in state):
            raise ValueError("statistics state: saved with source='micro_batch' for a "
                             f"{'per-element' if 'm2' in state else 'norm'} rule; build the Accumulator with the "
                             "rule the state was saved with")
        entry = state["micro_batch"]
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ValueError("statistics state: 'micro_batch' must be (micro_batches, samples, weighted sums)")
        k, n, weighted = entry
        for what, value in (("micro_batches", k), ("samples", n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"statistics state: the micro-batch source's {what} must be an int >= 0, "
                                 f"got {value!r}")
        if (k == 0) != (n == 0) or k > n:
            raise ValueError(f"statistics state: {k} measured micro-batches cannot hold {n} samples")
        if not isinstance(weighted, (list, tuple)) or len(weighted) != len(self.names):
            raise ValueError(f"statistics state: the micro-batch source's sums must be a list of {len(self.names)} "
                             "floats (one per parameter)")
        for w in weighted:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise ValueError(f"statistics state: a micro-batch source's sum must be a finite float >= 0, got {w!r}")
        checked: tuple[Any, ...] = (k, n, [float(w) for w in weighted])
        if self.statistics == "elements":
            checked = (*checked, *self._check_m2(state["m2"], state.get("m2_scale")))
        return checked

    def _check_m2(self, m2: Any, scale: Any) -> tuple[list[torch.Tensor | None], float]:
        """The per-element ``M2`` state: one tensor (or None) per parameter, of its shape, finite
        and >= 0; its scale a finite float > 0. Copies, so that the state stays the caller's."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ValueError(f"statistics state: 'm2_scale' must be a finite float > 0, got {scale!r}")
        if not isinstance(m2, (list, tuple)) or len(m2) != len(self.names):
            raise ValueError(f"statistics state: 'm2' must be a list of {len(self.names)} tensors or None "
                             "(one per parameter)")
        out: list[torch.Tensor | None] = []
        params: list[torch.nn.Parameter | None] = list(self._params) or [None] * len(self.names)
        for m, name, p in zip(m2, self.names, params):
            if m is None:
                out.append(None)
                continue
            if not isinstance(m, torch.Tensor) or (p is not None and m.shape != p.shape):
                raise ValueError(f"statistics state: 'm2' of {name} must be a tensor of its parameter's shape")
            if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
                raise ValueError(f"statistics state: 'm2' of {name} must be finite and >= 0")
            out.append(m.detach().clone().to(device=p.device if p is not None else m.device))
        return out, float(scale)

    def is_empty(self, checked: Any) -> bool:
        return checked[1] == 0

    def load_state_dict(self, state: Any) -> None:
        checked = self.check_state(state)
        self.micro_batches, self.samples, self.weighted = checked[:3]
        if self.statistics == "elements":
            self.m2, self.m2_scale = checked[3:]
        self._last = None
