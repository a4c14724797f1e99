"""The per-element path in one pass per step: the guard, Chan's merge and the GSNR decision as
fused kernels (``torch.compile``; inductor's C++ backend on the CPU). docs/design.md, "Fused
kernels".

Every step of the per-element path is elementwise arithmetic over all parameter elements. Run
op by op (the foreach code of ``_guard``, ``_merge`` and ``_reductions``) each step is several
passes over memory: three for the guard, four for the merge, about eight for the decision,
about 15 per increment. Here each step is one generated loop that reads its operands once,
keeps the intermediates in registers and writes only what it changes: three passes per
increment (the guard; the merge, which also takes the decision's largest second moment; the
decision's sum of ratios), no temporaries. On 1M float32 elements a kernel takes 0.15-0.3 ms, against about 0.05 ms for
each foreach pass it replaces (``benchmarks/statistics_overhead.py --foreach`` compares whole
increments). The merge also takes the decision's maximum, on a block of 2^19 elements
(``_blocks``) as it is merged: 131 us against 108 + 101 us for the merge and a separate pass
(on 16M elements at once the same loop measured 27 ms against 8.9 + 3.4 ms apart, so it pays
only on blocks in cache), and the decision then makes one pass (``_reductions``).

They run where they pay and work: CPU tensors of float32 or float64, at least ``FUSED_FROM``
elements in all (on small models the foreach kernels are already few launches and one compiled
call per parameter would cost more), and a machine on which the kernels compile (a C++
compiler; the first compile of a dtype takes seconds, then torch's on-disk cache serves it).
Elsewhere the foreach code runs: the same arithmetic, to rounding (the parity tests run on both:
the ``kernels`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger("gradaccum")

FUSED_FROM = 1 << 20  # elements in all from which the fused kernels run
DTYPES = (torch.float32, torch.float64)


def _guard(m2b: torch.Tensor, s1: torch.Tensor, inv_n: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``m2b`` (given S2) becomes the raw ``M2_b = S2 - S1^2 / n``; returns ``min(M2_b - c S1^2)``."""
    raw = m2b - s1 * s1 * inv_n
    m2b.copy_(raw)
    return (raw - c * s1 * s1).min()


def _merge(mean: torch.Tensor, m2: torch.Tensor, s1: torch.Tensor, m2b: torch.Tensor, n_b: torch.Tensor,
           inv_n: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Chan's merge: ``D = S1 - n_b mean``, ``M2 += M2_b + D^2 n_a / (n_b n)`` in place, and the merged
    mean ``mean + D / n`` written into ``m2b`` (the increment's, no longer needed: ``run_merge`` copies
    it into ``mean``); returns the merged ``max(mu^2 + M2 / n)``, the decision's floor (``_largest``)
    taken in the same loop. Writing the mean in place instead made inductor allocate a temporary
    the size of the operands on every call."""
    d = s1 - n_b * mean
    merged_mean = mean + d * inv_n
    merged_m2 = m2 + (m2b + d * d * weight)
    m2.copy_(merged_m2)
    m2b.copy_(merged_mean)
    return (merged_m2 * inv_n + merged_mean * merged_mean).max()


def _largest(mean: torch.Tensor, m2: torch.Tensor, inv_n: torch.Tensor) -> torch.Tensor:
    """``max(mu^2 + M2 / n)``, NaN if a moment is not finite (the decision's floor)."""
    return (m2 * inv_n + mean * mean).max()


def _ratios(mean: torch.Tensor, m2: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum mu^2 / M2`` over the live elements (``M2 > threshold``) and their count."""
    live = m2 > threshold
    return torch.where(live, mean * mean / torch.clamp_min(m2, threshold), 0.0).sum(), live.sum()


class Kernels:
    """The four kernels as one statistics object runs them (``PerSampleGradStats`` holds one):
    compiled on first use (shapes symbolic; a process compiles each kernel once, later objects
    reuse its code), checked against the foreach arithmetic once per dtype, and whether they
    run here (``broken``: why not)."""

    def __init__(self) -> None:
        self.broken: str | None = None
        self.checked: set[torch.dtype] = set()
        self.guard: Any = None  # the compiled kernels, from the first ``ready``
        self.merge: Any = None
        self.largest: Any = None
        self.ratios: Any = None

    def for_operands(self, *operands: Sequence[torch.Tensor], elements: int | None = None) -> Kernels | None:
        """These kernels if they should run on ``operands`` (lists of tensors; see the module
        docstring), else None. ``elements``: the model's, when the operands are a block of it
        (default: the first list's)."""
        if elements is None:
            elements = sum(t.numel() for t in operands[0])
        if not operands[0] or elements < FUSED_FROM:
            return None
        dtype = operands[0][0].dtype
        if dtype not in DTYPES or any(t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous()
                                      or not t.numel() for ts in operands for t in ts):
            return None
        return self if self.ready(dtype) else None

    def _compile(self) -> None:
        if self.guard is None:
            compile_ = lambda f: torch.compile(f, dynamic=True, fullgraph=True)  # noqa: E731
            self.guard, self.merge, self.largest, self.ratios = (
                compile_(f) for f in (_guard, _merge, _largest, _ratios))

    def ready(self, dtype: torch.dtype) -> bool:
        """Whether the kernels run for ``dtype`` here: compiled on a small case and checked
        against the foreach arithmetic the first time (a failure is logged and remembered)."""
        if self.broken is not None:
            return False
        if dtype in self.checked:
            return True
        try:
            self._compile()
            with _quiet():
                for size in (37, 1, 5000):  # sizes 1 and above 4096 compile their own specialisations: now, not mid-run
                    _self_check(self, dtype, size)
        except Exception as error:  # no C++ compiler, an unsupported platform, a dynamo limitation
            self.broken = f"{type(error).__name__}: {error}"
            log.warning("gradaccum: the fused statistics kernels do not compile here (%s); using the foreach "
                        "kernels (same results, more passes over memory)", self.broken)
            return False
        self.checked.add(dtype)
        return True


def _self_check(kernels: Kernels, dtype: torch.dtype, size: int) -> None:
    g = torch.Generator().manual_seed(0)
    s1, s2, mean, m2 = (torch.rand(size, generator=g, dtype=torch.float64).to(dtype) + 1 for _ in range(4))
    s2 = s2 + s1 * s1 / 3
    want_m2b = s2 - s1 * s1 / 3
    m2b = s2.clone()
    low = kernels.guard(m2b, s1, _scalar(1 / 3, dtype), _scalar(0.0, dtype))
    got_mean, got_m2 = m2b.clone(), m2.clone()  # the merged mean comes back in the increment's M2 buffer
    merged_largest = kernels.merge(mean, got_m2, s1, got_mean, _scalar(3.0, dtype), _scalar(1 / 5, dtype),
                                   _scalar(2 / 15, dtype))
    d = s1 - 3 * mean
    want_mean, want_m2 = mean + d / 5, m2 + want_m2b + d * d * 2 / 15
    checks = [(low, want_m2b.min()), (m2b, want_m2b), (got_mean, want_mean), (got_m2, want_m2),
              (merged_largest, (want_m2 / 5 + want_mean * want_mean).max()),
              (kernels.largest(mean, m2, _scalar(0.5, dtype)), (m2 / 2 + mean * mean).max())]
    total, live = kernels.ratios(mean, m2, _scalar(1.5, dtype))
    checks += [(total, torch.where(m2 > 1.5, mean * mean / m2, 0).sum()), (live, (m2 > 1.5).sum())]
    for got, want in checks:
        if not torch.allclose(got.to(torch.float64), want.to(torch.float64), rtol=1e-5, atol=0):
            raise RuntimeError("the compiled kernels disagree with the foreach arithmetic on a small case")


@contextlib.contextmanager
def _quiet():
    """No autograd, and no warnings from a compilation (torch's own deprecations inside inductor)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d operand (a tensor, so that a new value does not recompile)."""
    return torch.tensor(value, dtype=dtype)


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view (``Kernels.for_operands`` admits only contiguous operands): outputs are written in place."""
    return t.view(-1)


def run_guard(kernels: Kernels, m2s: list[torch.Tensor], firsts: list[torch.Tensor], n: int,
              coefficients: list[float]) -> list[torch.Tensor]:
    """``m2s`` (the sums of squares) become the raw increment ``M2_b`` in place; returns each
    parameter's lowest slack ``min(M2_b - c S1^2)`` (0-d tensors)."""
    inv_n = _scalar(1.0 / n, m2s[0].dtype)
    with _quiet():
        return [kernels.guard(flat(m2), flat(s1), inv_n, _scalar(c, m2.dtype))
                for m2, s1, c in zip(m2s, firsts, coefficients)]


def run_merge(kernels: Kernels, means: list[torch.Tensor], m2_a: list[torch.Tensor], firsts: list[torch.Tensor],
              m2s: list[torch.Tensor], n_a: int, n_b: int) -> torch.Tensor:
    """Chan's merge of the increment (sums ``firsts``, ``M2_b`` in ``m2s``) into ``means`` and ``m2_a``, in
    place; returns the merged ``max(mu^2 + M2 / n)`` over them (0-d, NaN if a moment is not finite)."""
    n = n_a + n_b
    dtype = means[0].dtype
    scalars = (_scalar(float(n_b), dtype), _scalar(1.0 / n, dtype), _scalar(n_a / (n_b * n), dtype))
    with _quiet():
        largest = torch.stack([kernels.merge(flat(mean), flat(m2), flat(s1), flat(m2b), *scalars)
                               for mean, m2, s1, m2b in zip(means, m2_a, firsts, m2s)]).max()
    torch._foreach_copy_(means, m2s)  # the merged means (in cache: a block at a time)
    return largest


def run_largest(kernels: Kernels, means: Sequence[torch.Tensor], m2s: Sequence[torch.Tensor], n: float) -> torch.Tensor:
    inv_n = _scalar(1.0 / n, means[0].dtype)
    with _quiet():
        return torch.stack([kernels.largest(flat(m), flat(m2), inv_n) for m, m2 in zip(means, m2s)]).max()


def run_ratios(kernels: Kernels, means: Sequence[torch.Tensor], m2s: Sequence[torch.Tensor], threshold: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    t = _scalar(threshold, means[0].dtype)
    with _quiet():
        parts = [kernels.ratios(flat(m), flat(m2), t) for m, m2 in zip(means, m2s)]
    return torch.stack([p[0] for p in parts]).sum(), torch.stack([p[1] for p in parts]).sum()
