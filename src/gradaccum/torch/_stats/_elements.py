"""The per-element statistic (docs/design.md, "Moments"): each parameter's running count,
mean and ``M2`` over the window's samples, merged increment by increment with Chan's formula
in blocks (``_blocks``), the precision guard checking each increment (``_guard``). Its fused
kernels (``_fused``) and the GSNR decision's state (``_reductions``) are its own: it hands its
moments to the core with the implementation that reduces them (``ElementStatistics``)."""

from __future__ import annotations

from typing import Any

import torch

from ..._core.moments import Moments
from ..._core.noise_scale import NormSums
from ..._core.statistics import ElementStatistics
from ._blocks import PartialCommit, commit_in_blocks
from ._fused import Kernels
from ._guard import flag_coefficient
from ._increment import Increment
from ._merge import merge_into
from ._reductions import Reductions
from ._scratch import Scratch
from ._statistic import Reduce, Statistic


class ElementMoments(Statistic):
    """Per-element running moments per parameter.

    Args:
      params, names: the parameters (order of the increment's lists) and their names.
    """

    statistics = "elements"
    norm_formulas = False

    def __init__(self, params: list[torch.nn.Parameter], names: list[str]) -> None:
        self._params = params
        self._names = names
        self._moments: list[Moments] | None = None
        self._lost: str | None = None  # why the moments were lost (``PartialCommit``), until reset
        self.kernels = Kernels()  # the fused kernels of the guard, the merge and the decision
        self.reductions = Reductions(self.kernels)  # the decision's implementation and its state
        self.scratch = Scratch()  # the commit's buffers, kept between increments

    @property
    def count(self) -> int:
        return 0 if self._moments is None else self._moments[0].n

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def refuse_lost(self) -> None:
        if self._lost is not None:
            raise ValueError(f"statistics: {self._lost}")

    @classmethod
    def check_sharded(cls) -> None:
        raise ValueError("statistics='elements': per-element moments are not taken on a model sharded with fully_shard "
                         "(each rank would need the moments of its shard from every rank's samples); use the "
                         "norm path (statistics='norms': NormTest, the noise-scale planners) or DDP")

    def merge(self, inc: Increment, sums: list[torch.Tensor | None], n: int, unscale: float,
              reduce: Reduce | None) -> int:
        """Chan's merge of the increment, in blocks; a failure after part of it went in loses the
        moments (``PartialCommit``: refused until ``reset``)."""
        firsts = [torch.zeros_like(p) if s1 is None else s1.detach() for p, s1 in zip(self._params, sums)]
        coefficients = [flag_coefficient(inc.terms[i] or n, p.dtype, n) for i, p in enumerate(self._params)]
        global_ = None if reduce is None else lambda s1, m2s, n_local: reduce_moments(reduce, s1, m2s, n_local)
        before = self.count
        try:
            self._moments = commit_in_blocks(self._moments, self._params, firsts, inc.squares, n, coefficients,
                                             inc.values, self._names, unscale, global_, self.reductions,
                                             self.scratch)
        except PartialCommit as error:
            self._moments, self._lost = None, str(error)
            raise
        return self.count - before  # the global increment's samples under data parallelism

    def merge_empty(self, reduce: Reduce) -> int:
        """Contributes zeros and merges what the other processes saw."""
        m2s = [torch.zeros_like(p) for p in self._params]
        firsts, n = reduce_moments(reduce, [torch.zeros_like(p) for p in self._params], m2s, 0)
        if n > 0:
            self._moments = merge_into(self._moments, firsts, m2s, n, kernels=self.kernels)[0]
        return n

    def reset(self) -> None:
        self._moments, self._lost = None, None

    def moments(self) -> ElementStatistics:
        """The running moments, with their ``gsnr_of`` (``Reductions.gsnr_of``)."""
        self.refuse_lost()
        if self._moments is None:
            raise ValueError("no increment has been committed yet")
        return ElementStatistics(self._moments, self.reductions.gsnr_of)

    def state_dict(self) -> dict[str, Any]:
        self.refuse_lost()
        if self._moments is None:
            return {"moments": None}
        return {"moments": [(m.n, m.mean.clone(), m.m2.clone()) for m in self._moments]}

    def check_state(self, state: Any) -> list[Moments] | None:
        if not isinstance(state, dict) or "moments" not in state:
            raise ValueError("statistics state must be a dict with 'moments' (from PerSampleGradStats.state_dict())")
        moments = state["moments"]
        if moments is None:
            return None
        if not isinstance(moments, (list, tuple)) or len(moments) != len(self._params):
            raise ValueError(f"statistics state must hold moments of {len(self._params)} parameters")
        out = []
        counts = set()
        for name, p, entry in zip(self._names, self._params, moments):
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
            out.append(Moments(n, mean.detach().to(p.device, p.dtype).clone(),
                               m2.detach().to(p.device, p.dtype).clone()))
        if len(counts) != 1:
            raise ValueError("statistics state: every parameter's moments must cover the same samples")
        return out

    def load(self, checked: list[Moments] | None) -> None:
        self._moments, self._lost = checked, None

    def norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> NormSums:
        raise ValueError("norm_sums needs PerSampleGradStats(statistics='norms')")

    def layer_norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> dict[str, NormSums]:
        raise ValueError("layer_norm_sums needs PerSampleGradStats(statistics='norms')")


def reduce_moments(reduce: Reduce, firsts: list[torch.Tensor], m2s: list[torch.Tensor],
                   n_local: int) -> tuple[list[torch.Tensor], int]:
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
