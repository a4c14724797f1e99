"""The explained-gradient check of an increment (``_explained`` says why and how).

After every backward each parameter's hooked per-sample gradients must add up to its real
gradient, to rounding. ``Check.floors`` raises every element's rounding bound to its layer's
largest; ``Check.unexplained`` names the parameters whose gradients the increment does not
explain. Under fully_shard the ranks' hooked sums, bounds and term counts are added up and each
rank checks the rows of its shard (``_sharded``), every rank getting the same verdict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._distributed import local, sum_over_ranks
from ._explained import Projector, unexplained
from ._increment import Increment
from ._sharded import agreed, local_rows


class Check:
    """The check for one model's parameters.

    Args:
      params: the parameters, in the order of the increment's lists.
      project: the projection the hooked sums were taken with.
      group: the shards' process group under fully_shard, else None.
    """

    def __init__(self, params: list[nn.Parameter], project: Projector, group: Any) -> None:
        self._params = params
        self._project = project
        self._group = group

    def unexplained(self, inc: Increment, indices: list[int], sums: list[torch.Tensor], n: int,
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
        present_hooked = [h for h in (hooked[j] for j in present) if h is not None]  # all of them, by `present`
        present_scales = [s for s in (scales[j] for j in present) if s is not None]
        summed = sum_over_ranks([*present_hooked, *present_scales, counts], self._group)
        for k, j in enumerate(present):
            p = self._params[indices[j]]
            hooked[j] = local_rows(p, summed[k])
            scales[j] = local_rows(p, summed[len(present) + k])
        totals = summed[-1].tolist()
        terms = [int(t) for t in totals[:len(indices)]]
        floors = totals[len(indices):]
        wrong = unexplained(local(grads), hooked, scales, terms, floors, self._project, dtype)  # type: ignore[arg-type]
        return [indices[j] for j in agreed(wrong, len(indices), self._group)]

    def floors(self, inc: Increment, groups: list[list[int]], n: int) -> None:
        """Each layer's floor for the check: the largest per-element magnitude bound among its
        parameters (see _explained), every group's maxima read in one synchronisation."""
        indices = sorted({i for group in groups for i in group if inc.has_bound(i)})
        if not indices:
            return
        maxima = torch.stack(torch._foreach_max([inc.bound_source(i) for i in indices])).to(torch.float64)
        bounds = (inc.element_bound(i, m, n, self._project) for i, m in zip(indices, maxima.tolist()))
        bound = dict(zip(indices, bounds))
        for group in groups:
            floor = max((bound[i] for i in group if i in bound), default=0.0)
            for i in group:
                inc.floor[i] = max(inc.floor[i], floor)
