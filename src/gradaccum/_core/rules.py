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

from .validation import check_positive_int


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
