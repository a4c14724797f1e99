"""The precision guard of the per-element path (docs/design.md, "Moments: the precision guard").

An increment's own ``M2_b = S2_b - S1_b^2 / n`` subtracts two float sums, and where an
element's gradient barely varies across samples (a high per-sample GSNR) the difference loses
every digit. The rounding error of a float sum of ``t`` terms is below ``LAMBDA sqrt(t) u``
times the sum of their magnitudes with probability at least ``1 - 2 exp(-LAMBDA^2 / 2)``
(Higham & Mary 2019), ``u`` the unit roundoff; ``S2_b`` and ``S1_b`` each sum ``t`` terms (the
increment's samples times positions), so

    |error of M2_b| <= c u S2_b,   c = LAMBDA (3 sqrt(t) + 1)

(S1_b's error enters doubled through ``S1_b^2 / n``, bounded via ``|S1_b| <= sqrt(n S2_b)``;
one more ``u`` for the subtraction). An element whose bound exceeds ``TOLERANCE`` relative is
*flagged*: ``c u S2_b > TOLERANCE M2_b``, i.e. with ``k = c u / TOLERANCE`` and
``S2_b = M2_b + S1_b^2 / n``, ``M2_b < k / ((1 - k) n) S1_b^2``. Flagged elements (and those
rounding left negative) are recomputed two-pass in float64 from their per-sample values, which
the layer's hooks still hold. Every element's ``M2_b`` then carries at most ``TOLERANCE``
relative error; Chan's merge across increments adds about ``u sqrt(GSNR_j)`` (its ``delta``
cancels only to the means' precision), so the mean GSNR is within about ``TOLERANCE`` of its
float64 value.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

TOLERANCE = 1e-5  # relative error allowed on an element's increment M2
LAMBDA = 6.0  # the probabilistic bound holds with probability >= 1 - 3e-8 per element

Values = Callable[[torch.Tensor], torch.Tensor]
"""Per-sample values of one parameter at flat element indices: ``(index,) -> (n, len(index))``."""


def flag_coefficient(terms: int, dtype: torch.dtype, samples: int) -> float:
    """``c'`` such that element j is flagged where ``M2_b < c' S1_b^2``. Where even an element
    without signal would miss the tolerance (``k >= 1``: low precision, huge ``t``), ``k`` is
    held just below 1, which flags every element whose mean is not negligible."""
    k = LAMBDA * (3.0 * math.sqrt(max(terms, 1)) + 1.0) * torch.finfo(dtype).eps / 2 / TOLERANCE
    k = min(k, 1.0 - 2.0**-20)
    return k / ((1.0 - k) * samples)


@torch.no_grad()
def increment_m2(firsts: list[torch.Tensor], seconds: list[torch.Tensor], n: int, coefficients: list[float],
                 values: list[Values | None], names: list[str]) -> list[torch.Tensor]:
    """Each parameter's ``M2_b`` over the increment's ``n`` samples, in place of ``seconds``
    (the sums of squares), flagged elements recomputed from ``values`` (see the module docstring).
    A few passes over the elements and one synchronisation; the recomputation costs only where
    elements are flagged.

    Raises ValueError when an element is flagged in a parameter that has no per-sample values.
    """
    m2s = seconds
    torch._foreach_addcmul_(m2s, firsts, firsts, value=-1.0 / n)
    slack = torch._foreach_addcmul(m2s, firsts, firsts, [-c for c in coefficients])
    torch._foreach_neg_(slack)  # c' S1_b^2 - M2_b: > 0 where flagged (and where rounding left M2_b negative)
    worst = torch.stack([w.to(torch.float64) for w in torch._foreach_max(slack)]).tolist()  # one synchronisation
    for i, w in enumerate(worst):
        if w > 0:  # NaN compares False: a non-finite moment is left for the statistic to report
            index = (slack[i] > 0).reshape(-1).nonzero().squeeze(1)
            source = values[i]
            if source is None:
                raise ValueError(f"{names[i]}: its increment's M2 needs recomputing (a high per-sample GSNR) and "
                                 "no layer gave its per-sample values; use a rule without statistics for it")
            m2s[i].view(-1)[index] = two_pass_m2(source(index)).to(m2s[i].dtype)
    return m2s


def two_pass_m2(values: torch.Tensor) -> torch.Tensor:
    """``sum_i (v_i - mean)^2`` over dim 0, in float64 (the textbook two-pass form)."""
    v = values.to(torch.float64)
    return (v - v.mean(0)).square_().sum(0)
