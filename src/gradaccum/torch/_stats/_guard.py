"""The precision guard of the per-element path (docs/design.md, "Moments: the precision guard").

An increment's own ``M2_b = S2_b - S1_b^2 / n`` subtracts two float sums, and where an
element's gradient barely varies across samples (a high per-sample GSNR) the difference loses
every digit. A float sum of ``t`` terms is typically off by about ``sqrt(t) u`` times the sum
of their magnitudes, ``u`` the unit roundoff (Higham & Mary 2019: the rounding errors behave
as independent, so the bound grows as ``sqrt(t)``, not ``t``, with overwhelming probability
for a constant a few times larger). ``S2_b`` and ``S1_b`` each sum ``t`` terms (the
increment's samples times positions), so, with ``|S1_b| <= sqrt(n S2_b)``,

    |error of M2_b| ~ c u S2_b,   c = 3 sqrt(t) + 1

and the relative error of ``M2_b`` is the float32 sums' own (``c u``) amplified by
``A = S2_b / M2_b``. An element is *flagged* where ``A > max(2, TOLERANCE / (c u))``: where
the cancellation would take ``M2_b`` past ``TOLERANCE`` relative, and never where it loses
less than one bit (there the error is the float sums' own, as in the gradient itself). With
``S2_b = M2_b + S1_b^2 / n`` that is ``M2_b < S1_b^2 / ((A - 1) n)``. Flagged elements (and
those rounding left negative) are recomputed two-pass in float64 from their per-sample values,
which the layer's hooks still hold. Chan's merge across increments then adds about
``u sqrt(n_b GSNR_j)`` on the between-increment part (its ``delta`` is known only to the
float32 means' precision).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._fused import Kernels, run_guard
from ._scratch import Scratch

TOLERANCE = 1e-5  # relative error allowed on an element's increment M2 (where float32 sums allow it)
MIN_AMPLIFICATION = 2.0  # never flag an element whose cancellation loses less than one bit
FOREACH_BELOW = 1 << 20  # elements below which the check runs over every parameter at once
CHUNK = 1 << 20  # above it, elements checked at a time through one scratch buffer

Values = Callable[[torch.Tensor], torch.Tensor]
"""Per-sample values of one parameter at flat element indices: ``(index,) -> (n, len(index))``."""


def flag_coefficient(terms: int, dtype: torch.dtype, samples: int) -> float:
    """``c'`` such that element j is flagged where ``M2_b < c' S1_b^2`` (see the module docstring)."""
    c = 3.0 * math.sqrt(max(terms, 1)) + 1.0
    amplification = max(MIN_AMPLIFICATION, TOLERANCE / (c * torch.finfo(dtype).eps / 2))
    return 1.0 / ((amplification - 1.0) * samples)


@torch.no_grad()
def increment_m2(firsts: list[torch.Tensor], seconds: list[torch.Tensor], n: int, coefficients: list[float],
                 values: list[Values | None], names: list[str], elements: int | None = None,
                 kernels: Kernels | None = None, scratch: Scratch | None = None) -> list[torch.Tensor]:
    """Each parameter's ``M2_b`` over the increment's ``n`` samples, in place of ``seconds``
    (the sums of squares), flagged elements recomputed from ``values`` (see the module docstring).
    A few passes over the elements and one synchronisation; the recomputation costs only where
    elements are flagged.

    ``elements``: the model's, where these are a block of it; ``kernels``: the fused kernels, which
    run where they pay (``Kernels.for_operands``; None: the foreach code); ``scratch``: the
    statistic's buffers, through which a large parameter is checked (None: a fresh one).

    Raises ValueError when an element is flagged in a parameter that has no per-sample values.
    """
    m2s = seconds
    fused = None if kernels is None else kernels.for_operands(m2s, firsts, elements=elements)
    if fused is not None:  # one pass
        lowest = torch.stack(run_guard(fused, m2s, firsts, n, coefficients))
    else:
        torch._foreach_addcmul_(m2s, firsts, firsts, value=-1.0 / n)
        if sum(m.numel() for m in m2s) <= FOREACH_BELOW:  # few kernel launches for every parameter at once
            slack = torch._foreach_addcmul(m2s, firsts, firsts, [-c for c in coefficients])
            lowest = torch.stack(torch._foreach_max(torch._foreach_neg(slack))).neg_()
        else:  # in chunks through one scratch buffer: no fresh model-sized memory per increment
            scratch = Scratch() if scratch is None else scratch
            lowest = torch.stack([_lowest_slack(m2, s1, c, scratch) for m2, s1, c in zip(m2s, firsts, coefficients)])
    worst = lowest.to(torch.float64).tolist()  # one synchronisation (stack promotes: exact)
    for i, w in enumerate(worst):
        if w < 0:  # M2_b < c' S1_b^2: flagged, or negative from rounding (NaN compares False: reported as is)
            index = (torch.addcmul(m2s[i], firsts[i], firsts[i], value=-coefficients[i]) < 0).reshape(-1)
            index = index.nonzero().squeeze(1)
            source = values[i]
            if source is None:
                raise ValueError(f"{names[i]}: its increment's M2 needs recomputing (a high per-sample GSNR) and "
                                 "no layer gave its per-sample values; use a rule without statistics for it")
            m2s[i].view(-1)[index] = two_pass_m2(source(index)).to(m2s[i].dtype)
    return m2s


def _lowest_slack(m2: torch.Tensor, s1: torch.Tensor, c: float, scratch: Scratch) -> torch.Tensor:
    """``min(M2_b - c' S1_b^2)`` over one parameter, CHUNK elements at a time through the
    ``"guard"`` buffer of ``scratch``."""
    buffer, flat_m2, flat_s1 = scratch.take("guard", CHUNK, m2.dtype, m2.device), m2.reshape(-1), s1.reshape(-1)
    lows = []
    for start in range(0, flat_m2.numel(), CHUNK):
        part = flat_m2[start:start + CHUNK]
        out = buffer[:part.numel()]
        torch.addcmul(part, flat_s1[start:start + CHUNK], flat_s1[start:start + CHUNK], value=-c, out=out)
        lows.append(out.min())
    return torch.stack(lows).min()


def two_pass_m2(values: torch.Tensor) -> torch.Tensor:
    """``sum_i (v_i - mean)^2`` over dim 0, in float64 (the textbook two-pass form)."""
    v = values.to(torch.float64)
    return (v - v.mean(0)).square_().sum(0)
