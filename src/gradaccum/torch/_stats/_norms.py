"""The norm path's statistic (docs/design.md, "Norm path"): per parameter, ``sum_i |g_i|^2``
over the window's samples, a float64 scalar, and the samples; with the window's gradient sum
it makes the noise terms (``NormSums``), per model or per layer."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..._core.moments import Moments
from ..._core.noise_scale import NormSums
from .._distributed import local, sum_over_ranks
from ._elements import reduce_moments
from ._increment import Increment
from ._statistic import Reduce, Statistic


class NormSquares(Statistic):
    """The window's samples and each parameter's ``sum_i |g_i|^2``.

    Args:
      params: the parameters (order of the increment's lists).
      owners: the layer each parameter counts for in ``layer_norm_sums``.
      group: the shards' process group under fully_shard (the terms are summed over it), else None.
    """

    statistics = "norms"
    norm_formulas = True

    def __init__(self, params: list[torch.nn.Parameter], owners: list[str], group: Any) -> None:
        self._params = params
        self._owners = owners
        self._group = group
        self.samples = 0
        self.totals = [0.0] * len(params)

    @property
    def count(self) -> int:
        return self.samples

    def merge(self, inc: Increment, sums: list[torch.Tensor | None], n: int, unscale: float,
              reduce: Reduce | None) -> int:
        """Adds the increment's ``sum_i |g_i|^2`` (read in one synchronisation); ``reduce`` is not
        used: the norm path sums its scalars over processes at the decision."""
        parts = [inc.squared_norm(i) for i in range(len(self._params))]
        present = [i for i, t in enumerate(parts) if t is not None]
        if present:  # one synchronisation for every parameter
            values = torch.stack([parts[i] for i in present]).to(torch.float64).tolist()  # type: ignore[misc]
            for i, v in zip(present, values):
                self.totals[i] += v / (unscale * unscale)
        self.samples += n
        return n

    def merge_empty(self, reduce: Reduce) -> int:
        """Joins the increment's reductions with zeros (every process takes part in each) and keeps
        nothing of it: the norm path sums its scalars over processes at the decision."""
        zeros = [torch.zeros_like(p) for p in self._params]
        return reduce_moments(reduce, [torch.zeros_like(p) for p in self._params], zeros, 0)[1]

    def reset(self) -> None:
        self.samples, self.totals = 0, [0.0] * len(self._params)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": (self.samples, list(self.totals))}

    def check_state(self, state: Any) -> tuple[int, list[float]]:
        if not isinstance(state, dict) or "norms" not in state:
            raise ValueError("statistics state must be a dict with 'norms' (from "
                             "PerSampleGradStats(statistics='norms').state_dict())")
        entry = state["norms"]
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError("statistics state: 'norms' must be (samples, per-parameter sums of squared norms)")
        n, totals = entry
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"statistics state: the norm path's sample count must be an int >= 0, got {n!r}")
        size = len(self._params)
        if not isinstance(totals, (list, tuple)) or len(totals) != size:
            raise ValueError(f"statistics state: the sums of squared norms must be a list of {size} floats (one per "
                             f"parameter), got {type(totals).__name__}")
        for total in totals:
            if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 <= total < math.inf:
                raise ValueError(f"statistics state: a sum of squared norms must be a finite float >= 0, got {total!r}")
        return n, [float(t) for t in totals]

    def load(self, checked: tuple[int, list[float]]) -> None:
        self.samples, self.totals = checked

    def moments(self) -> list[Moments]:
        raise ValueError("the norm path keeps no per-element moments (statistics='norms'): use norm_sums")

    def norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> NormSums:
        samples, totals, squared = self._terms(window_sums, scale)
        return NormSums.of(samples, math.fsum(totals), math.fsum(squared))

    def layer_norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> dict[str, NormSums]:
        samples, totals, squared = self._terms(window_sums, scale)
        layers: dict[str, tuple[list[float], list[float]]] = {}
        for owner, total, sq in zip(self._owners, totals, squared):
            entry = layers.setdefault(owner, ([], []))
            entry[0].append(total)
            entry[1].append(sq)
        return {name: NormSums.of(samples, math.fsum(t), math.fsum(q)) for name, (t, q) in layers.items()}

    def _terms(self, window_sums: list[torch.Tensor | None], scale: float) -> tuple[int, list[float], list[float]]:
        """The window's samples, each parameter's ``sum_i |g_i|^2`` and ``|S1|^2``: this
        process's, or under fully_shard every rank's added up (one all-reduce of scalars), the
        squared norms of the shards adding up to the whole sum's."""
        squared = self._squared_norms(local(window_sums), scale)
        if self._group is None:
            return self.samples, self.totals, squared
        size = len(self._params)
        flat = torch.tensor([float(self.samples), *self.totals, *squared], dtype=torch.float64)
        (flat,) = sum_over_ranks([flat], self._group)
        values = flat.tolist()
        return int(values[0]), values[1:1 + size], values[1 + size:]

    def _squared_norms(self, window_sums: list[torch.Tensor | None], scale: float) -> list[float]:
        """Each parameter's ``|S1|^2`` (0 where it has no sum), read in one synchronisation."""
        present = [i for i, t in enumerate(window_sums) if t is not None]
        out = [0.0] * len(self._params)
        if present:
            norms = torch.stack(torch._foreach_norm([window_sums[i].detach() for i in present]))  # type: ignore[union-attr]
            for i, v in zip(present, norms.to(torch.float64).square().tolist()):
                out[i] = v / (scale * scale)
        return out
