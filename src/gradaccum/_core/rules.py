"""Stopping rules: when does an accumulation window have enough signal?

A rule is a pure decision on a snapshot of the window so far (``WindowView``) and
answers ``Decision(stop, info)``, in the spirit of optax's ``should_skip_update_fn``:
the same rule object serves the PyTorch and the JAX backend, because it never
touches framework arrays itself. Rules that need per-sample statistics say so with
``needs_statistics = True``; the backend then gathers them, and rules that do not
(``FixedSteps``) cost nothing extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

from array_api_compat import array_namespace

from .statistics import bounded_stop, gsnr_of, norm_test_of, sample_count, where_enough
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
    if isinstance(rule, type):
        raise TypeError(f"rule must be a rule instance, got the class {rule.__name__}: "
                        f"write {rule.__name__}(...), for example gradaccum.FixedSteps(4)")
    if not isinstance(rule, StoppingRule):
        raise TypeError(
            "rule must be a stopping rule with a `needs_statistics` attribute and a `decide(window)` "
            f"method (for example gradaccum.FixedSteps(4)) or a planner with `plan(history)`, got {rule!r}"
        )
    return rule


_SCALES = ("sample", "mean")


@dataclass(frozen=True, kw_only=True)
class _SampleRule:
    """Shared fields of rules that add ``increment`` samples until a test passes or the cap.

    Subclasses define ``decision(n, means, m2s) -> (stop, info)`` on arrays only (the array
    API): the host-side ``decide`` and the JAX backend's traced decision both run it, so
    a rule's decision is defined once for every backend.
    """

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

    def decision(self, n: Any, means: Sequence[Any], m2s: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def decide(self, window: WindowView) -> Decision:
        stats = window.statistics
        if stats is None:
            raise ValueError(f"{type(self).__name__} needs per-sample statistics in window.statistics")
        n = sample_count(stats)
        stop, info = self.decision(n, [m.mean for m in stats], [m.m2 for m in stats])
        return Decision(bool(stop), {k: _python(v) for k, v in info.items()})


@dataclass(frozen=True)
class GSNR(_SampleRule):
    """GSNR-adaptive accumulation (GAGA): stop when the mean gradient SNR exceeds ``tau``.

    ``scale="sample"`` tests the per-sample GSNR ``mean_j mu_j^2 / var_j`` (the original
    GAGA, tau = 0.0984 in the reference experiment); it tends to the true value plus
    1/n, so a fixed tau tends to stop at the first increment or run to the cap.
    ``scale="mean"`` tests ``n mu_j^2 / var_j``, the SNR of the accumulated mean
    gradient, whose no-signal floor is about 1: useful tau are > 1. Elements without a
    measurable variance are left out of the mean and counted in the record's
    ``zero_variance_elements`` (``statistics.live_elements``). The window always closes
    at ``max_samples``.
    """

    tau: float
    scale: str = field(default="sample", kw_only=True)
    needs_statistics: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        check_positive_float("tau", self.tau)
        check_choice("scale", self.scale, _SCALES)
        self._check_sizes()

    def decision(self, n: Any, means: Sequence[Any], m2s: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        value, _, skipped = gsnr_of(means, m2s, n, self.scale)
        value = where_enough(n, value)
        stop = bounded_stop(n, value > self.tau, self.max_samples, self.min_samples)
        return stop, {"samples": n, "gsnr": value, "capped": n >= self.max_samples,
                      "zero_variance_elements": skipped}


@dataclass(frozen=True)
class NormTest(_SampleRule):
    """The norm test (Byrd et al. 2012; De et al. 2017) in its practical form: stop when
    ``sum_j var_j / n <= theta^2 * |mu|^2``, with ``mu`` the window's mean gradient.

    ``|mu|^2`` is biased: its expectation is ``|G|^2 + tr(Sigma) / n``. So with the gradient
    noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018) the test passes,
    in expectation, once ``n >= B_simple * (1 - theta^2) / theta^2``, and always for
    ``theta >= 1`` (not at ``n >= B_simple / theta^2``, which is the unbiased form's answer).
    """

    theta: float
    needs_statistics: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        check_positive_float("theta", self.theta)
        self._check_sizes()

    def decision(self, n: Any, means: Sequence[Any], m2s: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        xp = array_namespace(means[0])
        variance, squared = norm_test_of(means, m2s, n)
        bound = self.theta**2 * squared
        positive = bound > 0
        ratio = xp.where(positive, variance / xp.where(positive, bound, xp.ones_like(bound)),
                         xp.asarray(math.inf, dtype=bound.dtype))
        ratio = where_enough(n, ratio)
        stop = bounded_stop(n, ratio <= 1.0, self.max_samples, self.min_samples)
        return stop, {"samples": n, "norm_test": ratio, "capped": n >= self.max_samples}


def _python(value: Any) -> Any:
    """A 0-d array (or Python scalar) as the Python bool, int or float it holds."""
    if isinstance(value, (bool, int, float)):
        return value
    if value.dtype == bool or str(value.dtype) == "bool" or "bool" in str(value.dtype):
        return bool(value)
    if "int" in str(value.dtype):
        return int(value)
    return float(value)
