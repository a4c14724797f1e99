"""Stopping rules: when does an accumulation window have enough signal?

A rule is a pure decision on a snapshot of the window so far (``WindowView``) and
answers ``Decision(stop, info)``, in the spirit of optax's ``should_skip_update_fn``:
the same rule object serves the PyTorch and the JAX backend, because it never
touches framework arrays itself. Rules that need per-sample statistics say so with
``needs_statistics = True``; the backend then gathers them, and rules that do not
(``FixedSteps``) cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Protocol, runtime_checkable

from .statistics import mean_gsnr, norm_test_terms, sample_count
from .validation import check_choice, check_positive_float, check_positive_int


class WindowView(NamedTuple):
    """What a rule may look at after each micro-batch of the current window.

    Attributes:
      micro_batches: micro-batches accumulated in this window so far (>= 1).
      items: items (samples or tokens) accumulated in this window so far, summed over
        processes under data parallelism.
      statistics: per-sample gradient statistics of the window, or ``None`` when the
        rule does not ask for them.
    """

    micro_batches: int
    items: int
    statistics: Any = None


class Decision(NamedTuple):
    """A rule's answer: ``stop`` closes the window; ``info`` goes into the step record."""

    stop: bool
    info: Mapping[str, float]


@runtime_checkable
class StoppingRule(Protocol):
    """The protocol every stopping rule follows.

    Attributes:
      needs_statistics: whether ``decide`` reads ``window.statistics``.
    """

    needs_statistics: bool

    def decide(self, window: WindowView) -> Decision:
        """Return whether the window is complete after the micro-batch just added."""
        ...


@dataclass(frozen=True)
class FixedSteps:
    """Close the window after ``k`` micro-batches: ordinary gradient accumulation.

    The applied gradient is still the mean over every item of the window (the
    backend weights micro-batches by their item counts), so unequal micro-batches
    and a short last window are exact.
    """

    k: int
    needs_statistics: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        check_positive_int("k", self.k)

    def decide(self, window: WindowView) -> Decision:
        return Decision(window.micro_batches >= self.k, {})


def check_rule(rule: Any) -> StoppingRule:
    """Return ``rule`` if it follows the ``StoppingRule`` protocol, else raise TypeError."""
    if not isinstance(rule, StoppingRule):
        raise TypeError(
            "rule must be a stopping rule with a `needs_statistics` attribute and a "
            f"`decide(window)` method (for example gradaccum.FixedSteps(4)), got {rule!r}"
        )
    return rule


_SCALES = ("sample", "mean")


@dataclass(frozen=True, kw_only=True)
class _SampleRule:
    """Shared fields of rules that add ``increment`` samples until a test passes or the cap."""

    increment: int = 32
    max_samples: int = 512
    min_samples: int | None = None

    def _check_sizes(self) -> None:
        check_positive_int("increment", self.increment)
        check_positive_int("max_samples", self.max_samples)
        if self.increment > self.max_samples:
            raise ValueError(f"increment ({self.increment}) must be <= max_samples ({self.max_samples})")
        if self.min_samples is not None:
            check_positive_int("min_samples", self.min_samples)
            if self.min_samples > self.max_samples:
                raise ValueError(f"min_samples ({self.min_samples}) must be <= max_samples ({self.max_samples})")

    def _bounds(self, window: WindowView) -> tuple[int, bool | None]:
        """The window's sample count, and a forced decision (cap / too few) or None."""
        stats = window.statistics
        if stats is None:
            raise ValueError(f"{type(self).__name__} needs per-sample statistics in window.statistics")
        n = sample_count(stats)
        if n >= self.max_samples:
            return n, True
        if n < max(2, self.min_samples or 0):
            return n, False
        return n, None


@dataclass(frozen=True)
class GSNR(_SampleRule):
    """GSNR-adaptive accumulation (GAGA): stop when the mean gradient SNR exceeds ``tau``.

    ``scale="sample"`` tests the per-sample GSNR ``mean_j mu_j^2 / var_j`` (the original
    GAGA, tau = 0.0984 in the reference experiment); it tends to the true value plus
    1/n, so a fixed tau tends to stop at the first increment or run to the cap.
    ``scale="mean"`` tests ``n mu_j^2 / var_j``, the SNR of the accumulated mean
    gradient, whose no-signal floor is about 1: useful tau are > 1. Elements with zero
    variance are left out of the mean (see ``statistics.mean_gsnr``). The window always
    closes at ``max_samples``.
    """

    tau: float
    scale: str = field(default="sample", kw_only=True)
    needs_statistics: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        check_positive_float("tau", self.tau)
        check_choice("scale", self.scale, _SCALES)
        self._check_sizes()

    def decide(self, window: WindowView) -> Decision:
        n, forced = self._bounds(window)
        if n < 2:
            return Decision(bool(forced), {"samples": n, "gsnr": float("nan"), "capped": bool(forced)})
        g = mean_gsnr(window.statistics, self.scale)
        stop = g.value > self.tau if forced is None else forced
        return Decision(stop, {"samples": n, "gsnr": g.value, "capped": n >= self.max_samples,
                               "zero_variance_elements": g.skipped})


@dataclass(frozen=True)
class NormTest(_SampleRule):
    """The norm test (Byrd et al. 2012; De et al. 2017): stop when
    ``sum_j var_j / n <= theta^2 * |mu|^2``, i.e. once n exceeds the gradient noise
    scale ``B_simple / theta^2`` (McCandlish et al. 2018)."""

    theta: float
    needs_statistics: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        check_positive_float("theta", self.theta)
        self._check_sizes()

    def decide(self, window: WindowView) -> Decision:
        n, forced = self._bounds(window)
        if n < 2:
            return Decision(bool(forced), {"samples": n, "norm_test": float("nan"), "capped": bool(forced)})
        terms = norm_test_terms(window.statistics)
        bound = self.theta**2 * terms.squared_norm
        ratio = terms.variance_of_mean / bound if bound > 0 else float("inf")
        stop = ratio <= 1.0 if forced is None else forced
        return Decision(stop, {"samples": n, "norm_test": ratio, "capped": n >= self.max_samples})
