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
rounding. A layer may give its own bound instead (``magnitudes``: for ``nn.Linear``
``|D_:j| |X|_F |v|``, from norms of its input and output gradient, so that no pass over S2
is made). That bound misses cancellation *within* a sample (the bias of an attention
key projection has a gradient that is zero up to rounding, summed from large terms),
so every element's bound is raised to a floor: the largest bound among the elements of
all parameters of the same layer (a key bias's rounding noise is that of the terms the
layer's weight sums, whose own gradients are not small). ``autocast`` is 4 units of
bfloat16/float16 precision when the layers ran in it (autograd rounds each gradient to it),
else 0. So in float32 at n = 512, L = 4096 a missed use must be below about 5e-4 of the
gradient's magnitude, and in float64 below 1e-12; under bfloat16 autocast below about 3 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class Projector:
    """Fixed pseudo-random probe vectors, one per length, seeded by the length (deterministic)."""

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._sums: dict[tuple[str, int], float] = {}

    def vector(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (size, dtype, device)
        if key not in self._vectors:
            g = torch.Generator().manual_seed(7919 * size + 1)
            vector = torch.rand(size, generator=g, dtype=torch.float64) + 0.5
            self._vectors[key] = vector.to(dtype=dtype, device=device)
        return self._vectors[key]

    def abs_sum(self, size: int) -> float:
        """``sum |v|`` of the vector of that length (1 for vectors, which are compared whole)."""
        return 1.0 if size <= 1 else self._reduced("sum", size, lambda v: v.abs().sum())

    def norm(self, size: int) -> float:
        """``|v|`` of the vector of that length."""
        return self._reduced("norm", size, torch.linalg.vector_norm)

    def _reduced(self, name: str, size: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """``reduce`` of the float64 vector of that length, computed once."""
        key = (name, size)
        if key not in self._sums:
            self._sums[key] = float(reduce(self.vector(size, torch.float64, torch.device("cpu"))))
        return self._sums[key]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` projected along its last dimension (a vector parameter is compared whole)."""
        if t.dim() < 2:
            return t
        return t.reshape(-1, t.shape[-1]) @ self.vector(t.shape[-1], t.dtype, t.device)


def relative_tolerance(dtype: torch.dtype, compute_dtype: torch.dtype, terms: int, length: int) -> float:
    """How far, relative to the magnitude bound, two orders of the same sum of ``terms`` terms may differ."""
    low = torch.finfo(compute_dtype)
    return (terms + length) * torch.finfo(dtype).eps + (4 * low.eps if low.bits < 32 else 0.0)


ROWS_CHUNK = 1 << 18  # elements whose square roots are held at once (not a parameter-sized temporary)


def scale_from_squares(squares: torch.Tensor, n: int, project: Projector) -> torch.Tensor:
    """The projected magnitude bound ``project(sqrt(n S2), |v|)`` (Cauchy-Schwarz), the rows of a
    large parameter a block at a time through one small buffer."""
    if squares.dim() < 2:
        return squares.sqrt() * math.sqrt(n)
    rows = squares.reshape(-1, squares.shape[-1])
    v = project.vector(rows.shape[1], rows.dtype, rows.device).abs()
    block = max(1, ROWS_CHUNK // rows.shape[1])
    if rows.shape[0] <= block:
        return (rows.sqrt() @ v) * math.sqrt(n)
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    buffer = torch.empty(block, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for start in range(0, rows.shape[0], block):
        part = rows[start:start + block]
        root = torch.sqrt(part, out=buffer[:part.shape[0]])
        torch.mv(root, v, out=out[start:start + part.shape[0]])
    return out.mul_(math.sqrt(n))


def unexplained(grads: list[torch.Tensor], hooked: list[torch.Tensor | None], scales: list[torch.Tensor | None],
                terms: list[int], floors: list[float], project: Projector, compute_dtype: torch.dtype) -> list[int]:
    """The positions in the lists whose hooked, projected gradient sum is farther from the
    real gradient's projection than rounding allows; read with one synchronisation.

    ``scales[j]`` is the projected magnitude of the terms summed into gradient ``j``, ``terms[j]``
    how many there are per element, ``floors[j]`` a per-element magnitude every element's bound
    is raised to. A gradient without a hooked sum or scale is explained only if it is zero.
    A difference above ``((terms + L) eps + autocast) * (scale + floor * sum|v|)`` is not
    rounding; all parameters are compared by a few foreach kernels."""
    missing = [j for j in range(len(grads)) if (hooked[j] is None or scales[j] is None) and grads[j].numel()]
    present = [j for j in range(len(grads)) if hooked[j] is not None and scales[j] is not None and grads[j].numel()]
    checks = [torch.stack([(grads[j] != 0).any() for j in missing])] if missing else []
    if present:
        reals = [project(_as(grads[j].detach(), hooked[j].dtype)) for j in present]  # type: ignore[union-attr]
        diffs = torch._foreach_sub(reals, [hooked[j] for j in present])  # type: ignore[misc]
        torch._foreach_abs_(diffs)
        tols, offsets = [], []
        for j, real in zip(present, reals):
            length = grads[j].shape[-1] if grads[j].dim() >= 2 else 1
            tol = relative_tolerance(real.dtype, compute_dtype, terms[j], length)
            tols.append(tol)
            offsets.append(tol * project.abs_sum(length) * floors[j] + torch.finfo(real.dtype).tiny)
        allowed = torch._foreach_mul([scales[j] for j in present], tols)  # type: ignore[misc]
        torch._foreach_add_(allowed, offsets)
        torch._foreach_sub_(diffs, allowed)  # > 0 where rounding does not explain the difference
        checks.append(torch.stack(torch._foreach_max(diffs)) > 0)
    if not checks:
        return []
    verdict = torch.cat([c.to("cpu") for c in checks]).tolist()
    return [j for j, wrong in zip(missing + present, verdict) if wrong]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
