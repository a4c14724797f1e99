"""Does what the hooks saw explain each parameter's gradient? (docs/design.md, "Exact or refused")

Module hooks see the calls of registered layers; they do not see a weight used outside
its module (``F.linear(h, self.wte.weight)`` for a tied head), a parameter read directly
in a ``forward``, a subclass whose ``forward`` differs from its registered base, or a
penalty on the weights added to the loss. In each of those the per-sample gradients the
hooks build do not add up to the parameter's real gradient, and the statistics would
be silently wrong. So after every backward the sum over samples of the hooked per-sample
gradients is compared with the gradient autograd computed.

The comparison runs on projections, so that the fast paths never have to form the full
sum: a tensor of shape (..., L) is multiplied by a fixed random vector of length L
(``D^T (X v)`` for a Linear layer costs two matrix-vector products instead of a GEMM).
A non-zero difference that survives the projection is missed only if it is orthogonal to
the vector in every row, which fixed random vectors make a probability-zero event.

The tolerance bounds rounding: a sum of n terms in precision eps differs from another
order of the same sum by at most about ``n * eps * sum_i |g_i|`` (and the projection's
dot product of length L adds ``L * eps``), and ``sum_i |g_ij| <= sqrt(n * S2_j)``
(Cauchy-Schwarz), where S2 is the sum of squares the statistics compute anyway. A
difference above ``((n + L) * eps + autocast) * project(sqrt(n * S2), |v|)`` is not
rounding. That bound misses cancellation *within* a sample (the bias of an attention
key projection has a gradient that is zero up to rounding, summed from large terms),
so every element's bound is raised to a floor: the largest bound among the elements of
all parameters of the same layer (a key bias's rounding noise is that of the terms the
layer's weight sums, whose own gradients are not small). ``autocast`` is 4 units of bfloat16/float16 precision when the layers ran in
it (autograd rounds each gradient to it), else 0. So in float32 at n = 512, L = 4096 a
missed use must be below about 5e-4 of the gradient's magnitude, and in float64 below
1e-12; under bfloat16 autocast below about 3 %.
"""

from __future__ import annotations

import math

import torch


class Projector:
    """Fixed pseudo-random probe vectors, one per length, seeded by the length (deterministic)."""

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def vector(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (size, dtype, device)
        if key not in self._vectors:
            g = torch.Generator().manual_seed(7919 * size + 1)
            self._vectors[key] = (torch.rand(size, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
        return self._vectors[key]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` projected along its last dimension (a vector parameter is compared whole)."""
        if t.dim() < 2:
            return t
        return t.reshape(-1, t.shape[-1]) @ self.vector(t.shape[-1], t.dtype, t.device)


def relative_tolerance(dtype: torch.dtype, compute_dtype: torch.dtype, n: int, length: int) -> float:
    """How far, relative to the magnitude bound, two orders of the same sum may differ."""
    low = torch.finfo(compute_dtype)
    return (n + length) * torch.finfo(dtype).eps + (4 * low.eps if low.bits < 32 else 0.0)


def mismatch(grad: torch.Tensor, hooked: torch.Tensor | None, squares: torch.Tensor | None, n: int,
             project: Projector, compute_dtype: torch.dtype, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """How far the hooked, projected gradient sum is from the real one, in units of the
    tolerance (> 1 means the hooks do not explain the gradient), as a 0-d tensor so that the
    caller reads all parameters' verdicts with one synchronisation."""
    real = project(grad.detach().to(hooked.dtype if hooked is not None else grad.dtype))
    if hooked is None or squares is None:
        return torch.where((real != 0).any(), torch.inf, 0.0).to(torch.float64)
    # project(sqrt(n S2) + floor, |v|) = project(sqrt(S2), |v|) sqrt(n) + floor sum|v|: one pass
    scale = squares.sqrt()
    if scale.dim() >= 2:
        v = project.vector(scale.shape[-1], scale.dtype, scale.device).abs()
        scale = (scale.reshape(-1, scale.shape[-1]) @ v) * math.sqrt(n) + floor * v.sum()
    else:
        scale = scale * math.sqrt(n) + floor
    length = grad.shape[-1] if grad.dim() >= 2 else 1
    allowed = relative_tolerance(real.dtype, compute_dtype, n, length) * scale + torch.finfo(real.dtype).tiny
    return ((real - hooked).abs() / allowed).max().to(torch.float64)


def failing(ratios: list[tuple[int, torch.Tensor]]) -> list[int]:
    """The indices whose mismatch exceeds the tolerance, read in one synchronisation."""
    if not ratios:
        return []
    verdict = (torch.stack([r.to("cpu") for _, r in ratios]) > 1).tolist()
    return [i for (i, _), bad in zip(ratios, verdict) if bad]

