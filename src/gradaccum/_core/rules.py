"""Stopping rules: when does an accumulation window have enough signal?

A rule is a pure decision on a snapshot of the window so far (``WindowView``) and
answers ``Decision(stop, info)``, in the spirit of optax's ``should_skip_update_fn``:
the same rule object serves the PyTorch and the JAX backend, because it never
touches framework arrays itself. Rules that need per-sample statistics say so with
``needs_statistics = True``; the backend then gathers them, and rules that do not
(``FixedSteps``) cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from array_api_compat import array_namespace

from .arrays import host_array, is_python, namespace, python, ratio_or_inf
from .moments import at_least_1
from .noise_scale import NormStatistics, noise_terms
from .statistics import GSNRFunction, bounded_stop, gsnr_function, gsnr_of, sample_count, where_enough
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
      statistics (optional): which statistics: ``"elements"`` (default; per-element moments,
        a list of ``Moments``) or ``"norms"`` (``NormStatistics``: the samples and unbiased
        ``tr(Sigma)`` and ``|G|^2``, gathered from per-sample gradient norms at almost no cost).
    """

    # read-only: a rule may hold it as a plain attribute, a frozen dataclass field or a property
    @property
    def needs_statistics(self) -> bool: ...

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
KINDS = ("elements", "norms")


def statistics_kind(rule: Any) -> str:
    """Which statistics ``rule`` reads: ``"elements"`` or ``"norms"`` (see ``StoppingRule``)."""
    return check_choice("statistics", getattr(rule, "statistics", "elements"), KINDS)


SOURCES = ("micro_batch", "per_sample")
"""Where a rule's or planner's statistics come from (``source``):

- ``"micro_batch"``: the micro-batches' own gradients (their squared norms, taken in the pass
  the finiteness check makes): no hooks, any model, about free; a window needs two or more
  micro-batches (or data-parallel ranks) to have a variance. Norm statistics on every
  backend; per-element statistics (the variance of the micro-batch means, one
  parameter-sized buffer) where the backend takes them (``statistics_source``).
- ``"per_sample"``: per-sample gradients from layer hooks (``PerSampleGradStats``): a variance
  from one micro-batch, and a lower-variance estimate; costs a share of the backward, and
  refuses what it cannot explain (compiled models, active dropout).
"""


def statistics_source(rule: Any, *, elements: bool = False, backend: str = "this backend") -> str:
    """Where ``rule`` takes its statistics from: ``"per_sample"`` unless it says ``source``.

    Each backend says what its micro-batch source measures: ``elements=True`` where it takes
    per-element statistics from the micro-batches (``_core.micro_batch.element_moments``);
    elsewhere a rule or planner reading per-element statistics (``GSNR``, ``GSNRPlanner``)
    with ``source="micro_batch"`` is refused, naming ``backend``."""
    source = check_choice("source", getattr(rule, "source", "per_sample"), SOURCES)
    if source == "micro_batch" and statistics_kind(rule) != "norms" and not elements:
        raise ValueError(f"source='micro_batch': {type(rule).__name__} reads per-element statistics, which "
                         f"{backend} does not take from the micro-batches (its micro-batch source measures norm "
                         "statistics: NormTest, NoiseScalePlanner, NormTestPlanner); use source='per_sample'")
    return source


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
        stop, info = self._decision_on(stats, n, [m.mean for m in stats], [m.m2 for m in stats])
        return Decision(bool(stop), {k: python(v) for k, v in info.items()})

    def _decision_on(self, stats: Sequence[Any], n: Any, means: Sequence[Any], m2s: Sequence[Any]
                     ) -> tuple[Any, dict[str, Any]]:
        """``decision`` on the moments ``stats`` (which may carry their backend's implementations)."""
        return self.decision(n, means, m2s)


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

    ``source`` (``SOURCES``): per-sample gradients (``"per_sample"``), or the variance of the
    micro-batches' means (``"micro_batch"``, docs/design.md, "Micro-batch statistics"; where
    the backend takes it), which needs two micro-batches before the test can pass.
    """

    tau: float
    scale: str = field(default="sample", kw_only=True)
    source: str = field(default="per_sample", kw_only=True)
    needs_statistics: bool = field(default=True, init=False)
    statistics: str = field(default="elements", init=False)

    def __post_init__(self) -> None:
        check_positive_float("tau", self.tau)
        check_choice("scale", self.scale, _SCALES)
        check_choice("source", self.source, SOURCES)
        self._check_sizes()

    def decision(self, n: Any, means: Sequence[Any], m2s: Sequence[Any], gsnr: GSNRFunction = gsnr_of
                 ) -> tuple[Any, dict[str, Any]]:
        """The decision on the window's moments; ``gsnr``: the implementation of
        ``statistics.gsnr_of`` to run (a backend's, which its statistics carry)."""
        value, _, skipped = gsnr(means, m2s, n, self.scale)
        value = where_enough(n, value)
        stop = bounded_stop(n, value > self.tau, self.max_samples, self.min_samples)
        return stop, {"samples": n, "gsnr": value, "capped": n >= self.max_samples,
                      "zero_variance_elements": skipped}

    def _decision_on(self, stats: Sequence[Any], n: Any, means: Sequence[Any], m2s: Sequence[Any]
                     ) -> tuple[Any, dict[str, Any]]:
        return self.decision(n, means, m2s, gsnr_function(stats))


@dataclass(frozen=True)
class NormTest(_SampleRule):
    """The norm test (Byrd et al. 2012; De et al. 2017): stop when the variance of the
    window's mean gradient is small against its squared norm,
    ``tr(Sigma) / n <= theta^2 * |mu|^2``, with ``mu`` the window's mean gradient.

    Byrd et al.'s practical form (default) compares with the biased ``|mu|^2``, whose
    expectation is ``|G|^2 + tr(Sigma) / n``: with the gradient noise scale
    ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018) it passes, in expectation, once
    ``n >= B_simple * (1 - theta^2) / theta^2``, and always for ``theta >= 1``.
    ``unbiased=True`` compares with the unbiased ``|G|^2 = |mu|^2 - tr(Sigma) / n`` instead and
    passes once ``n >= B_simple / theta^2``. The record's ``norm_test`` is the ratio of the
    two sides (<= 1 passes); ``noise_scale`` is the window's ``B_simple``.

    It needs only ``tr(Sigma)`` and ``|mu|^2``: no per-element moments, and under data
    parallelism one all-reduce of a few scalars per increment. ``source`` says where they come
    from (``SOURCES``): per-sample gradient norms (``"per_sample"``, docs/design.md, "Norm
    path"), which measure a window of one micro-batch, or the micro-batches' own gradients
    (``"micro_batch"``, the default; docs/design.md, "Micro-batch statistics"), which cost about
    nothing on any model and need two micro-batches before the test can pass (``samples`` then
    counts the ``samples=`` of each micro-batch, or its items).
    """

    theta: float
    unbiased: bool = field(default=False, kw_only=True)
    source: str = field(default="micro_batch", kw_only=True)
    needs_statistics: bool = field(default=True, init=False)
    statistics: str = field(default="norms", init=False)

    def __post_init__(self) -> None:
        check_positive_float("theta", self.theta)
        check_choice("source", self.source, SOURCES)
        if not isinstance(self.unbiased, bool):
            raise TypeError(f"unbiased must be a bool, got {self.unbiased!r}")
        self._check_sizes()

    def decision(self, n: Any, means: Sequence[Any], m2s: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        xp = array_namespace(means[0])
        trace, squared = noise_terms(n, means, m2s)
        return self.decision_from_terms(n, trace, squared, sum(xp.sum(m * m) for m in means))

    def decision_from_terms(self, n: Any, trace: Any, squared_norm: Any, mean_squared: Any = None
                            ) -> tuple[Any, dict[str, Any]]:
        """The decision from the window's samples and unbiased ``tr(Sigma)`` and ``|G|^2``
        (arrays or Python floats), and ``|mu|^2`` where it is known directly (else
        ``|G|^2 + tr(Sigma) / n``): what both statistics paths and every backend run. Python
        numbers give Python numbers."""
        host = is_python(trace, squared_norm)  # Python numbers stay Python numbers: the same float64 arithmetic
        nf = n if isinstance(n, (int, float)) else namespace(trace, squared_norm).astype(n, host_array(trace).dtype)
        variance = trace / at_least_1(nf)
        mean_squared = squared_norm + variance if mean_squared is None else mean_squared
        bound = self.theta**2 * (squared_norm if self.unbiased else mean_squared)
        ratio = where_enough(n, ratio_or_inf(variance, bound))
        noise = where_enough(n, ratio_or_inf(trace, squared_norm))
        stop = bounded_stop(n, ratio <= 1.0, self.max_samples, self.min_samples)
        info = {"samples": n, "norm_test": ratio, "noise_scale": noise, "capped": n >= self.max_samples}
        if host:
            return python(stop), {k: python(v) for k, v in info.items()}
        return stop, info

    def decide(self, window: WindowView) -> Decision:
        stats = window.statistics
        if isinstance(stats, NormStatistics):
            stop, info = self.decision_from_terms(stats.samples, stats.trace, stats.squared_norm)
            return Decision(bool(stop), {k: python(v) for k, v in info.items()})
        return super().decide(window)
