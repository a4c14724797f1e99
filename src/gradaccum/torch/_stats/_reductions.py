"""The rules' statistics over torch moments, in few passes and no fresh allocations.

Same numbers as ``gradaccum._core.statistics`` (the definitions): the tests hold the
two to agree in float64. One scratch tensor per parameter is reused across increments.
"""

from __future__ import annotations

import torch

from ..._core.moments import Moments
from ..._core.statistics import GSNRValue, NormTestValue

_FLAT_BELOW = 1 << 20  # parameter elements below which the reductions run on one flat copy


class TorchMoments(list):
    """A list of per-parameter ``Moments`` whose statistics run as fused torch reductions."""

    def __init__(self, moments: list[Moments], scratch: list[torch.Tensor]) -> None:
        super().__init__(moments)
        self._scratch = scratch

    def mean_gsnr(self, scale: str) -> GSNRValue:
        n = self[0].n
        if n < 2:
            raise ValueError(f"variance needs at least 2 samples, got n={n}")
        with torch.no_grad():
            means, m2s = [m.mean for m in self], [m.m2 for m in self]
            torch._foreach_copy_(self._scratch, means)
            torch._foreach_mul_(self._scratch, means)
            torch._foreach_div_(self._scratch, m2s)  # M2 >= 0; where it is 0 the element is skipped below
            if sum(r.numel() for r in self._scratch) <= _FLAT_BELOW:
                # small models: one kernel each over all parameters beats one per parameter
                ratios, m2_flat = torch.cat([r.view(-1) for r in self._scratch]), torch.cat([m.view(-1) for m in m2s])
                total = float(ratios.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).sum())
                elements, numel = int(torch.count_nonzero(m2_flat)), m2_flat.numel()
            else:
                total, elements, numel = 0.0, 0, 0
                for r, m2 in zip(self._scratch, m2s):
                    total += float(r.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).sum())
                    elements += int(torch.count_nonzero(m2))
                    numel += m2.numel()
        if elements == 0:
            return GSNRValue(0.0, 0, numel)
        value = total * (n - 1) / elements  # mu^2 / var = (n - 1) mu^2 / M2
        return GSNRValue(value * n if scale == "mean" else value, elements, numel - elements)

    def norm_test_terms(self) -> NormTestValue:
        n = self[0].n
        if n < 2:
            raise ValueError(f"variance needs at least 2 samples, got n={n}")
        with torch.no_grad():
            m2 = sum(float(m.m2.sum()) for m in self)
            squared = sum(float(torch.linalg.vector_norm(m.mean)) ** 2 for m in self)
        return NormTestValue(m2 / (n - 1) / n, squared)
