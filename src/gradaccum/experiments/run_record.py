"""What both trainers share: the seeded data order and the record of one run.

A trainer (``trainer_torch``, ``trainer_jax``) returns ``Trained``: its step records and
validation curve; ``runs.train_run`` turns that into a ``RunResult`` the same way for both
backends, so ``steps`` means the same thing in both: optimizer steps applied.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from .errors import SettingsError

if TYPE_CHECKING:  # the JAX trainer draws its order without torch
    import torch


@dataclass
class Window:
    """One closed window, as a trainer saw it."""

    items: int
    micro_batches: int
    skipped: bool
    reason: str  # "rule", "flush" or "nonfinite"
    statistic: float | None = None
    trace: float | None = None  # the window's unbiased tr(Sigma) and |G|^2, when its rule measured them
    squared_norm: float | None = None
    samples: int = 0  # samples (sequences for the LM) in the window


@dataclass
class Evaluation:
    """One evaluation during a run: after ``samples`` training samples and ``steps`` optimizer
    steps, ``seconds`` of training (evaluations excluded), the metric on the validation split
    (accuracy for mnist1d, loss for the LM). The test split is read once, after training."""

    samples: int
    steps: int
    seconds: float
    val: float


@dataclass
class Trained:
    """What a trainer hands back: windows, validation curve, accuracies, time, warnings."""

    windows: list[Window]
    val_curve: list[tuple[int, float]]
    final_val_accuracy: float
    test_accuracy: float
    wall_seconds: float
    diverged: bool
    warnings: list[str] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)


@dataclass
class RunResult:
    """What one run measured; JSON-serialisable via ``as_dict``.

    ``steps`` counts optimizer steps applied (windows skipped for a non-finite gradient do
    not count). ``batch_sizes`` are the windows the rule closed; a partial window left at
    the end of the budget (applied by ``flush``) is counted in ``flushed_items`` instead.
    ``noise_terms`` holds each window's ``[samples, tr(Sigma), |G|^2]`` (None where its rule
    measured nothing): the gradient noise scale of a stretch of training is the ratio of the
    terms' means over its windows, not a mean or median of per-window ratios (biased low).
    ``diverged``: the loss or gradient became non-finite and training stopped (torch) or
    dropped micro-batches (JAX); the accuracies are those of the weights at that point.
    """

    arm: str
    params: dict[str, float]
    seed: int
    test_accuracy: float
    final_val_accuracy: float
    val_curve: list[tuple[int, float]]
    steps: int
    batch_sizes: list[int]
    flushed_items: int
    statistic: list[float | None]
    wall_seconds: float
    warnings: list[str] = field(default_factory=list)
    diverged: bool = False
    evaluations: list[Evaluation] = field(default_factory=list)
    noise_terms: list[list[float] | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, arm: str, params: dict[str, float], seed: int, trained: Trained) -> RunResult:
        windows = trained.windows
        return cls(arm=arm, params=dict(params), seed=seed, test_accuracy=trained.test_accuracy,
                   final_val_accuracy=trained.final_val_accuracy, val_curve=trained.val_curve,
                   steps=sum(not w.skipped for w in windows),
                   batch_sizes=[w.items for w in windows if w.reason == "rule" and not w.skipped],
                   flushed_items=sum(w.items for w in windows if w.reason == "flush" and not w.skipped),
                   statistic=[w.statistic for w in windows], wall_seconds=trained.wall_seconds,
                   warnings=trained.warnings, diverged=trained.diverged, evaluations=trained.evaluations,
                   noise_terms=[_noise_terms(w) for w in windows])


def _noise_terms(w: Window) -> list[float] | None:
    """``[samples, tr(Sigma), |G|^2]`` of a window whose rule measured both, else None."""
    if w.trace is None or w.squared_norm is None:
        return None
    return [w.samples, w.trace, w.squared_norm]


_PROGRESS: ContextVar[Callable[[int], Any] | None] = ContextVar("gradaccum_progress", default=None)


def reporter() -> Callable[[int], Any] | None:
    """The progress callback of the enclosing ``progress`` block, if any (for trainers with their own loop)."""
    return _PROGRESS.get()


@contextmanager
def progress(report: Callable[[int], Any]) -> Iterator[None]:
    """Within the block, ``train_loop`` calls ``report(samples)`` after every micro-batch (the
    command line's progress bar), without a parameter threaded through every trainer."""
    token = _PROGRESS.set(report)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def train_loop(batches: Iterable[torch.Tensor], backward: Callable[[torch.Tensor], bool],
               evaluate: Callable[[], float], every: int, flush: Callable[[], Any]
               ) -> tuple[list[Evaluation], float, bool, list[str]]:
    """What both tasks' torch trainers do around their step: ``backward(indices)`` per
    micro-batch (True when the optimizer stepped), ``evaluate() -> val`` every ``every``
    samples, timed apart from training. A NonFiniteError ends the run as diverged; the
    Accumulator's RuntimeWarnings ("not adapting") are collected. Returns the evaluations, the
    training seconds, whether it diverged and the warnings."""
    from ..torch import NonFiniteError

    evaluations: list[Evaluation] = []
    report = _PROGRESS.get()
    seen, next_eval, diverged, steps, evaluating = 0, every, False, 0, 0.0
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            for idx in batches:
                steps += backward(idx)
                seen += len(idx)
                if report is not None:
                    report(len(idx))
                if seen >= next_eval:
                    now = time.perf_counter()
                    evaluations.append(Evaluation(seen, steps, now - start - evaluating, evaluate()))
                    evaluating += time.perf_counter() - now
                    next_eval += every
            flush()
        except NonFiniteError:
            diverged = True
    return evaluations, time.perf_counter() - start - evaluating, diverged, sorted({str(w.message) for w in caught})


def window(record: Any) -> Window:
    """A trainer's ``Window`` from one of the Accumulator's step records."""
    info = record.info
    terms = ("trace" in info and "squared_norm" in info and not record.skipped
             and all(isinstance(info[k], (int, float)) and math.isfinite(info[k]) for k in ("trace", "squared_norm")))
    return Window(record.items, record.micro_batches, record.skipped, record.reason, statistic(info),
                  float(info["trace"]) if terms else None, float(info["squared_norm"]) if terms else None,
                  record.samples if record.samples is not None else record.items)


def statistic(info: dict[str, Any]) -> float | None:
    """What a window's record says its rule read: the GSNR, the norm test's statistic, or the
    noise scale a planner planned from (None for a fixed or a ramp window)."""
    for key in ("gsnr", "norm_test", "noise_scale"):
        if key in info:
            return float(info[key])
    return None


@overload
def increments(n: int, size: int, budget: int, generator: torch.Generator) -> Iterator[torch.Tensor]: ...


@overload
def increments(n: int, size: int, budget: int, generator: np.random.Generator) -> Iterator[np.ndarray]: ...


def increments(n: int, size: int, budget: int, generator: torch.Generator | np.random.Generator
               ) -> Iterator[torch.Tensor | np.ndarray]:
    """Index batches of ``size`` drawn epoch by epoch from seeded shuffles, ``budget`` samples in all.

    ``generator``: a ``torch.Generator`` (the torch trainers: tensors of indices) or a NumPy
    ``Generator`` (the JAX trainer, which needs no torch: arrays of indices)."""
    if size > n:  # no batch fits in an epoch: refuse rather than loop without progress
        raise SettingsError(f"increment ({size}) is larger than the training split ({n} samples)")
    seen = 0
    while seen < budget:
        order = _permutation(n, generator)
        for i in range(0, n - size + 1, size):
            if seen >= budget:
                return
            take = min(size, budget - seen)
            seen += take
            yield order[i:i + take]


def _permutation(n: int, generator: torch.Generator | np.random.Generator) -> torch.Tensor | np.ndarray:
    """A seeded shuffle of ``range(n)`` from ``generator``'s library."""
    if isinstance(generator, np.random.Generator):
        return generator.permutation(n)
    import torch

    return torch.randperm(n, generator=generator)
