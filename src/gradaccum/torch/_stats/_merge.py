"""Chan's merge of an increment into the running moments, in place, for torch tensors.

The core's ``chan_merge`` is the definition (the code JAX runs); this is the same algebra arranged
so that an increment given by its sum S1 and its own M2_b (from ``_guard.increment_m2``, exact
to its stated tolerance) merges in four foreach passes (one fused pass where ``_fused`` runs) and no new
allocation (on a 21M-parameter model every temporary would cost 84 MB of fresh pages). With
D = S1 - n_b * mean_a = n_b * (mean_b - mean_a):

    mean = mean_a + D / n
    M2   = M2_a + M2_b + D^2 * n_a / (n_b * n)
"""

from __future__ import annotations

import torch

from ..._core.moments import Moments
from ._fused import Kernels, run_merge


def merge_into(state: list[Moments] | None, firsts: list[torch.Tensor], m2s: list[torch.Tensor],
               n_b: int, elements: int | None = None, kernels: Kernels | None = None
               ) -> tuple[list[Moments], torch.Tensor | None]:
    """Merge an increment of ``n_b`` samples with sums ``firsts`` and sums of squared deviations
    ``m2s`` into ``state``. ``m2s`` (and ``state``) are overwritten; ``firsts`` are not.
    ``elements``: the model's, where these are a block of it; ``kernels``: the fused kernels, which
    run where they pay (``Kernels.for_operands``; None: the foreach code). Returns the
    merged moments and, where the fused kernel merged them, their ``max(mu^2 + M2 / n)`` (the
    decision's floor, taken in the same loop), else None."""
    if state is None:
        return [Moments(n_b, mean, m2) for mean, m2 in zip(torch._foreach_div(firsts, n_b), m2s)], None
    n_a = state[0].n
    n = n_a + n_b
    means, m2_a = [m.mean for m in state], [m.m2 for m in state]
    fused = None if kernels is None else kernels.for_operands(means, m2_a, firsts, m2s, elements=elements)
    if fused is not None:  # one pass
        largest = run_merge(fused, means, m2_a, firsts, m2s, n_a, n_b)
        return [Moments(n, mean, m2) for mean, m2 in zip(means, m2_a)], largest
    torch._foreach_add_(m2_a, m2s)
    scratch = m2s  # m2s := D
    torch._foreach_copy_(scratch, firsts)
    torch._foreach_add_(scratch, means, alpha=-n_b)
    torch._foreach_add_(means, scratch, alpha=1.0 / n)
    torch._foreach_addcmul_(m2_a, scratch, scratch, value=n_a / (n_b * n))
    return [Moments(n, mean, m2) for mean, m2 in zip(means, m2_a)], None


def merge_sums_into(state: list[Moments] | None, firsts: list[torch.Tensor], seconds: list[torch.Tensor],
                    n_b: int, kernels: Kernels | None = None) -> list[Moments]:
    """The same from the increment's sums of squares ``seconds`` (overwritten), without the
    precision guard: ``M2_b = S2 - S1^2 / n_b``, clamped at 0 (what the parity tests hold
    against the core's ``chan_merge``); fused where a fresh ``Kernels`` runs, by default."""
    torch._foreach_addcmul_(seconds, firsts, firsts, value=-1.0 / n_b)
    torch._foreach_clamp_min_(seconds, 0.0)
    return merge_into(state, firsts, seconds, n_b, kernels=Kernels() if kernels is None else kernels)[0]
