"""The rules' statistics over torch moments, in few passes and no fresh allocations.

Same numbers as ``gradaccum._core.statistics`` (the definitions): the tests hold the
two to agree in float64. One scratch tensor per parameter is reused across increments.
"""

from __future__ import annotations

import torch

from ..._core.moments import Moments
from ..._core.statistics import GSNRValue, NormTestValue


class TorchMoments(list):
    """A list of per-parameter ``Moments`` whose statistics run as fused torch reductions."""

    def __init__(self, moments: list[Moments], scratch: list[torch.Tensor]) -> None:
        super().__init__(moments)
        self._scratch = scratch

    def mean_gsnr(self, scale: str) -> GSNRValue:
        n = self[0].n
        if n < 2:
            raise ValueError(f"variance needs at least 2 samples, got n={n}")
        total = 0.0
        elements = 0
        numel = 0
        with torch.no_grad():
            for m, r in zip(self, self._scratch):
                torch.mul(m.mean, m.mean, out=r)
                r.div_(m.m2)  # M2 >= 0; where it is 0 the element is skipped below
                r.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                total += float(r.sum())  # pairwise summation in the tensor dtype: fast and accurate
                elements += int(torch.count_nonzero(m.m2))
                numel += m.m2.numel()
        if elements == 0:
            return GSNRValue(0.0, 0, numel)
        value = float(total) * (n - 1) / elements  # mu^2 / var = (n - 1) mu^2 / M2
        return GSNRValue(value * n if scale == "mean" else value, elements, numel - elements)

    def norm_test_terms(self) -> NormTestValue:
        n = self[0].n
        if n < 2:
            raise ValueError(f"variance needs at least 2 samples, got n={n}")
        with torch.no_grad():
            m2 = sum(float(m.m2.sum()) for m in self)
            squared = sum(float(torch.linalg.vector_norm(m.mean)) ** 2 for m in self)
        return NormTestValue(m2 / (n - 1) / n, squared)
