"""The critical batch size, measured by branching short runs from checkpoints.

McCandlish et al. (2018) model the trade-off between optimizer steps ``S`` and training
samples ``E = S B`` needed to reach a given loss at batch size ``B`` (each at its best
learning rate) as

    S = S_min (1 + B_noise / B),        E = E_min (1 + B / B_noise),        E_min = S_min B_noise,

and argue that ``B_noise`` is about the gradient noise scale ``B_simple`` the planners measure.
Merrill et al. (2025) measure the critical batch size of OLMo directly instead, by branching
short runs at several batch sizes from checkpoints of one run. This module does that for any
model, framework and train step, behind the small ``BranchProblem`` protocol:

1. For each checkpoint, its loss ``L0`` on a fixed evaluation set (the user's; never a test
   split) and the target ``L0 - drop``.
2. For each batch size ``B``, learning rate of its grid and seed, a branch: the checkpoint
   restored, trained on batches of ``B`` samples, evaluated after steps 1, 2, ... and then
   every ``max(1, floor(spacing * k))`` steps; ``S`` is the step at which the loss, linearly
   interpolated between the last evaluation above the target and the first at or below it,
   reaches the target (a fractional step), ``E = S B``. A branch that does not reach the
   target within ``max_steps``, or whose loss is not finite, has no ``S`` (and says why).
3. Per batch size, the learning rate with the fewest mean steps over the seeds among those
   that reach the target in every seed (McCandlish et al.'s per-batch-size optimal
   learning rate, over the grid); a batch size with no such learning rate refuses the
   checkpoint (``CriticalBatchError``), it is never dropped from the fit.
4. The fits (``fit_tradeoff``): ``S`` is linear in ``1 / B`` and ``E`` linear in ``B``.
   The *joint* estimate, the one reported as ``b_noise``, minimises the relative squared errors
   of ``S`` and ``E`` together; since ``E_i = B_i S_i`` and the model's ``E(B) = B S(B)``, the
   two relative errors are equal, and the fit is weighted least squares of ``S = a + b / B``
   with weights ``1 / S_i^2``: ``S_min = a``, ``E_min = b``, ``B_noise = b / a``. The separate
   unweighted fits of ``S`` on ``1 / B`` and of ``E`` on ``B`` are reported beside it; on data
   that follow the model all three agree.
5. The critical batch size, two definitions: McCandlish et al.'s ``B_crit = E_min / S_min``,
   which is ``B_noise`` of the joint fit; and Zhang et al. (2024)'s, the batch size at which
   the steps exceed the linear-scaling prediction from the smallest batch ``B_0`` by 20 %:
   ``S(B) = 1.2 S(B_0) B_0 / B``, i.e. ``E(B) = 1.2 E(B_0)``; from the fitted model
   ``1.2 B_0 + 0.2 B_noise`` (``b_zhang``), and without the model the largest measured batch
   size whose ``E`` is within 20 % of the smallest batch's (``b_zhang_measured``).
6. Intervals: a bootstrap over seeds (the same resampled seeds for every batch size and
   learning rate, the learning rate chosen again in each resample), 2.5 and 97.5 percentiles of
   ``B_noise``; resamples whose fit is refused are counted (``bootstrap_refused``). With few
   seeds the interval is coarse (2 seeds give 3 distinct resamples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

__all__ = ["Branch", "BranchProblem", "CheckpointResult", "CriticalBatchError", "Tradeoff", "analyse_checkpoint",
           "evaluation_steps", "fit_samples", "fit_steps", "fit_tradeoff", "measure_branches",
           "measure_critical_batch", "run_branch", "zhang_measured", "ZHANG_MARGIN"]

ZHANG_MARGIN = 0.2
"""Zhang et al. (2024): the critical batch size is where the steps exceed linear scaling by 20 %."""


class CriticalBatchError(ValueError):
    """The critical batch size cannot be measured as asked: the message names the argument,
    the batch size or the checkpoint, and what to change."""


class BranchProblem(Protocol):
    """What the measurement needs of a model; the framework stays behind it.

    A *checkpoint* is whatever the user's ``restore`` takes (for PyTorch, a copy of the model
    and optimizer; for JAX, a train state); a *state* is what ``step`` trains.
    """

    def restore(self, checkpoint: Any) -> Any:
        """A fresh, trainable copy of ``checkpoint`` (parameters and optimizer state); the
        checkpoint itself must not change, every branch starts from it."""

    def step(self, state: Any, batch: Any, lr: float) -> Any:
        """One optimizer step of ``state`` on ``batch`` at learning rate ``lr``; returns the
        state (the same object updated, or a new one)."""

    def loss(self, state: Any) -> float:
        """The loss of ``state`` on the fixed evaluation set (the same samples every time)."""

    def batches(self, batch_size: int, seed: int) -> Iterator[Any]:
        """An endless stream of training batches of ``batch_size`` samples, fixed by ``seed``."""


@dataclass(frozen=True)
class Branch:
    """One branch run: from ``checkpoint`` at ``batch_size`` and ``lr`` with ``seed``.

    ``steps`` is the (interpolated, fractional) step at which the evaluation loss reached the
    target, None if it did not; ``why`` says "reached", "not reached in N steps" or "diverged at
    step k"; ``ran`` counts the steps taken, ``curve`` the evaluations ``(step, loss)``.
    """

    checkpoint: int
    batch_size: int
    lr: float
    seed: int
    steps: float | None
    why: str
    ran: int
    curve: tuple[tuple[int, float], ...] = ()

    @property
    def samples(self) -> float | None:
        return None if self.steps is None else self.steps * self.batch_size


@dataclass(frozen=True)
class Tradeoff:
    """``S = s_min (1 + b_noise / B)``, ``E = e_min (1 + B / b_noise)``, ``e_min = s_min b_noise``."""

    s_min: float
    e_min: float

    @property
    def b_noise(self) -> float:
        return self.e_min / self.s_min

    def steps(self, batch_size: float) -> float:
        return self.s_min * (1 + self.b_noise / batch_size)

    def samples(self, batch_size: float) -> float:
        return self.e_min * (1 + batch_size / self.b_noise)

    def as_dict(self) -> dict[str, float]:
        return {"s_min": self.s_min, "e_min": self.e_min, "b_noise": self.b_noise}


def _check_points(batch_sizes: Sequence[float], values: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(batch_sizes, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if b.ndim != 1 or v.shape != b.shape:
        raise CriticalBatchError(f"batch_sizes and {name} must be 1-d and of the same length, got shapes "
                                 f"{b.shape} and {v.shape}")
    if len(np.unique(b)) < 2:
        raise CriticalBatchError(f"batch_sizes: the fit needs at least 2 distinct batch sizes (4 or more to "
                                 f"see whether the model fits), got {list(batch_sizes)}")
    if not (np.isfinite(b).all() and (b > 0).all()):
        raise CriticalBatchError(f"batch_sizes must be positive and finite, got {list(batch_sizes)}")
    if not (np.isfinite(v).all() and (v > 0).all()):
        raise CriticalBatchError(f"{name} must be positive and finite (every batch size reached the drop), got "
                                 f"{list(values)}")
    return b, v


def _line(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Weighted least squares ``y = intercept + slope x``."""
    w = np.sqrt(weights)
    design = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(design, y * w, rcond=None)
    return float(intercept), float(slope)


def _tradeoff(s_min: float, e_min: float, batch_sizes: np.ndarray, fit: str) -> Tradeoff:
    """The fitted trade-off, or refused where the model's parameters are not positive."""
    low, high = int(batch_sizes.min()), int(batch_sizes.max())
    if not (math.isfinite(s_min) and math.isfinite(e_min)):
        raise CriticalBatchError(f"{fit}: the fit is not finite (S_min {s_min}, E_min {e_min})")
    if e_min <= 0:
        raise CriticalBatchError(f"{fit}: the steps do not fall as the batch grows (E_min = {e_min:.4g} <= 0): "
                                 f"B_noise is below the smallest batch measured ({low}); add smaller batch sizes")
    if s_min <= 0:
        raise CriticalBatchError(f"{fit}: the steps fall as 1/B or faster over the whole range (S_min = {s_min:.4g} "
                                 f"<= 0): B_noise is beyond the largest batch measured ({high}); add larger "
                                 "batch sizes")
    return Tradeoff(s_min, e_min)


def fit_steps(batch_sizes: Sequence[float], steps: Sequence[float]) -> Tradeoff:
    """Least squares of ``S = a + b / B``: ``S_min = a``, ``E_min = b``."""
    b, s = _check_points(batch_sizes, steps, "steps")
    a, slope = _line(1 / b, s, np.ones_like(s))
    return _tradeoff(a, slope, b, "the fit of S on 1/B")


def fit_samples(batch_sizes: Sequence[float], samples: Sequence[float]) -> Tradeoff:
    """Least squares of ``E = c + d B``: ``E_min = c``, ``S_min = d``."""
    b, e = _check_points(batch_sizes, samples, "samples")
    c, d = _line(b, e, np.ones_like(e))
    return _tradeoff(d, c, b, "the fit of E on B")


def fit_tradeoff(batch_sizes: Sequence[float], steps: Sequence[float]) -> Tradeoff:
    """The joint fit: the relative errors of ``S`` and ``E = B S`` together, which is weighted
    least squares of ``S = a + b / B`` with weights ``1 / S^2`` (module docstring, step 4)."""
    b, s = _check_points(batch_sizes, steps, "steps")
    a, slope = _line(1 / b, s, 1 / s**2)
    return _tradeoff(a, slope, b, "the joint fit of S and E")


def zhang_measured(batch_sizes: Sequence[float], steps: Sequence[float], margin: float = ZHANG_MARGIN) -> float:
    """The largest measured batch size whose samples ``E = B S`` are within ``1 + margin`` of
    the smallest batch size's (its steps within ``margin`` of linear scaling from there)."""
    b, s = _check_points(batch_sizes, steps, "steps")
    order = np.argsort(b)
    e = b[order] * s[order]
    return float(b[order][e <= (1 + margin) * e[0]].max())


def evaluation_steps(max_steps: int, spacing: float) -> list[int]:
    """The steps after which a branch evaluates: 1, 2, ..., then ``k + max(1, floor(spacing k))``
    up to ``max_steps`` (included)."""
    steps, k = [], 1
    while k < max_steps:
        steps.append(k)
        k += max(1, math.floor(spacing * k))
    return [*steps, max_steps]


def run_branch(problem: BranchProblem, checkpoint: Any, start_loss: float, target: float, batch_size: int,
               lr: float, seed: int, max_steps: int, spacing: float, index: int = 0) -> Branch:
    """One branch (module docstring, step 2): ``problem`` trains a restored copy of ``checkpoint``."""
    state = problem.restore(checkpoint)
    stream = problem.batches(batch_size, seed)
    curve: list[tuple[int, float]] = [(0, start_loss)]
    done = 0
    for at in evaluation_steps(max_steps, spacing):
        while done < at:
            state = problem.step(state, next(stream), lr)
            done += 1
        loss = float(problem.loss(state))
        curve.append((at, loss))
        if not math.isfinite(loss):
            return Branch(index, batch_size, lr, seed, None, f"diverged at step {at}", done, tuple(curve))
        if loss <= target:
            (k0, l0), (k1, l1) = curve[-2], curve[-1]
            steps = k0 + (k1 - k0) * (l0 - target) / (l0 - l1)
            return Branch(index, batch_size, lr, seed, steps, "reached", done, tuple(curve))
    return Branch(index, batch_size, lr, seed, None, f"not reached in {max_steps} steps", done, tuple(curve))


def _lr_grid(lrs: Sequence[float] | Mapping[int, Sequence[float]] | Callable[[int], Sequence[float]],
             batch_size: int) -> list[float]:
    grid = lrs(batch_size) if callable(lrs) else lrs[batch_size] if isinstance(lrs, Mapping) else lrs
    grid = [float(lr) for lr in grid]
    if not grid or not all(math.isfinite(lr) and lr > 0 for lr in grid) or len(set(grid)) != len(grid):
        raise CriticalBatchError(f"lrs: batch size {batch_size} needs a non-empty grid of distinct positive finite "
                                 f"learning rates, got {grid}")
    return grid


def _check_settings(batch_sizes: Sequence[int], seeds: Sequence[int], drops: Sequence[float], max_steps: int,
                    spacing: float) -> None:
    if len(set(batch_sizes)) != len(batch_sizes) or len(batch_sizes) < 2 \
            or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in batch_sizes):
        raise CriticalBatchError(f"batch_sizes: at least 2 distinct positive integers (4 or more spanning the "
                                 f"noise scale to see the trade-off), got {list(batch_sizes)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise CriticalBatchError(f"seeds: at least one, all distinct, got {list(seeds)}")
    if not all(math.isfinite(d) and d > 0 for d in drops):
        raise CriticalBatchError(f"drop: the loss drop to reach must be positive and finite, got {list(drops)}")
    if not (isinstance(max_steps, (int, np.integer)) and max_steps >= 1):
        raise CriticalBatchError(f"max_steps must be a positive integer, got {max_steps!r}")
    if not (math.isfinite(spacing) and spacing >= 0):
        raise CriticalBatchError(f"spacing must be >= 0 (0: evaluate after every step), got {spacing!r}")


def measure_branches(problem: BranchProblem, checkpoints: Sequence[Any], batch_sizes: Sequence[int],
                     lrs: Sequence[float] | Mapping[int, Sequence[float]] | Callable[[int], Sequence[float]],
                     drop: float | Sequence[float], *, seeds: Sequence[int] = (0, 1), max_steps: int = 1000,
                     spacing: float = 0.05, map: Callable[..., Iterable[Branch]] = map,
                     ) -> tuple[list[float], list[float], list[Branch]]:
    """Every branch of every checkpoint: ``(start_losses, drops, branches)``.

    ``drop``: the loss drop to reach, one for all checkpoints or one each. ``lrs``: one grid
    for every batch size, a mapping batch size -> grid, or a function of the batch size (a
    scaling rule). ``map``: how the branches run (``map``, or an executor's ``map`` when
    ``problem`` and the checkpoints pickle). Nothing is dropped here: ``analyse_checkpoint``
    refuses what cannot be fitted.
    """
    drops = [float(drop)] * len(checkpoints) if isinstance(drop, (int, float)) else [float(d) for d in drop]
    if not checkpoints or len(drops) != len(checkpoints):
        raise CriticalBatchError(f"drop: one for all checkpoints or one per checkpoint ({len(checkpoints)}), got "
                                 f"{len(drops)}")
    _check_settings(batch_sizes, seeds, drops, max_steps, spacing)
    grids = {b: _lr_grid(lrs, b) for b in batch_sizes}
    starts = [float(problem.loss(problem.restore(c))) for c in checkpoints]
    for k, start in enumerate(starts):
        if not math.isfinite(start):
            raise CriticalBatchError(f"checkpoints: checkpoint {k}'s evaluation loss is {start}, not finite")
    jobs = [(k, b, lr, seed) for k in range(len(checkpoints)) for b in batch_sizes for lr in grids[b] for seed in seeds]
    runs = list(map(partial(_job, problem, checkpoints, starts, drops, max_steps, spacing), jobs))
    return starts, drops, runs


def _job(problem: BranchProblem, checkpoints: Sequence[Any], starts: Sequence[float], drops: Sequence[float],
         max_steps: int, spacing: float, job: tuple[int, int, float, int]) -> Branch:
    k, b, lr, seed = job
    return run_branch(problem, checkpoints[k], starts[k], starts[k] - drops[k], b, lr, seed, max_steps, spacing, k)


@dataclass
class CheckpointResult:
    """What one checkpoint's branches measured, and the fits (module docstring).

    ``steps[i]`` and ``samples[i]`` are the means over seeds at ``batch_sizes[i]`` and its best
    learning rate ``lr[i]``; ``lr_at_edge`` lists the batch sizes whose best learning rate is
    at an end of their grid (widen the grid there). ``b_noise``, ``s_min``, ``e_min``: the
    joint fit; ``b_noise_steps``, ``b_noise_samples``: the separate fits of S and E;
    ``b_crit`` = ``E_min / S_min`` of the joint fit (= ``b_noise``); ``b_zhang`` and
    ``b_zhang_measured``: Zhang et al.'s definition, from the fit and from the measurements.
    """

    checkpoint: int
    start_loss: float
    drop: float
    batch_sizes: list[int]
    lr: list[float]
    steps: list[float]
    samples: list[float]
    seed_steps: list[list[float]]
    lr_at_edge: list[int]
    b_noise: float
    s_min: float
    e_min: float
    b_noise_steps: float
    b_noise_samples: float
    b_zhang: float
    b_zhang_measured: float
    b_noise_interval: tuple[float, float] | None
    bootstrap_refused: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def b_crit(self) -> float:
        return self.e_min / self.s_min

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "b_crit": self.b_crit}


def _best(runs: Sequence[Branch], batch_size: int, seeds: Sequence[int]) -> tuple[float, float, list[float]]:
    """``(lr, mean steps, per-seed steps)`` of the best learning rate at ``batch_size`` over
    ``seeds`` (repeats allowed: a bootstrap resample), or raise naming why none reached."""
    by_lr: dict[float, dict[int, Branch]] = {}
    for run in runs:
        by_lr.setdefault(run.lr, {})[run.seed] = run
    best: tuple[float, float, list[float]] | None = None
    for lr, of_seed in by_lr.items():
        steps = [of_seed[s].steps for s in seeds]
        reached = [float(x) for x in steps if x is not None]
        if len(reached) == len(steps):
            mean = float(np.mean(reached))
            if best is None or mean < best[1]:
                best = (lr, mean, reached)
    if best is None:
        why = "; ".join(f"lr {lr:.4g}: " + ", ".join(f"seed {s} {of_seed[s].why}" for s in dict.fromkeys(seeds))
                        for lr, of_seed in by_lr.items())
        raise CriticalBatchError(f"batch size {batch_size}: no learning rate reached the drop in every seed ({why}); "
                                 "raise max_steps, lower the drop or widen the lr grid (a batch size is never "
                                 "left out of the fit)")
    return best


def _per_batch(runs: Sequence[Branch], batch_sizes: Sequence[int], seeds: Sequence[int]
               ) -> list[tuple[float, float, list[float]]]:
    return [_best([r for r in runs if r.batch_size == b], b, seeds) for b in batch_sizes]


def analyse_checkpoint(runs: Sequence[Branch], start_loss: float, drop: float, *, bootstrap: int = 200,
                       rng_seed: int = 0) -> CheckpointResult:
    """The fits of one checkpoint's branches (all of one ``checkpoint``), or
    ``CriticalBatchError`` naming the batch size that reached no drop or the refused fit."""
    if not runs or len({r.checkpoint for r in runs}) != 1:
        raise CriticalBatchError("runs: the branches of exactly one checkpoint")
    batch_sizes = sorted({r.batch_size for r in runs})
    seeds = sorted({r.seed for r in runs})
    for b in batch_sizes:
        lrs = {r.lr for r in runs if r.batch_size == b}
        have = {(r.lr, r.seed) for r in runs if r.batch_size == b}
        if have != {(lr, s) for lr in lrs for s in seeds}:
            raise CriticalBatchError(f"runs: batch size {b} lacks some (lr, seed) branches; every learning rate of "
                                     f"its grid needs every seed {seeds}")
    best = _per_batch(runs, batch_sizes, seeds)
    steps = [s for _, s, _ in best]
    joint = fit_tradeoff(batch_sizes, steps)
    by_steps, by_samples = fit_steps(batch_sizes, steps), fit_samples(batch_sizes, [b * s for b, s in
                                                                                     zip(batch_sizes, steps)])
    edges = [b for b, (lr, _, _) in zip(batch_sizes, best)
             if len(grid := sorted({r.lr for r in runs if r.batch_size == b})) > 1 and lr in (grid[0], grid[-1])]
    interval, refused = _bootstrap(runs, batch_sizes, seeds, bootstrap, rng_seed)
    return CheckpointResult(
        runs[0].checkpoint, start_loss, drop, batch_sizes, [lr for lr, _, _ in best], steps,
        [b * s for b, s in zip(batch_sizes, steps)], [per for _, _, per in best], edges, joint.b_noise, joint.s_min,
        joint.e_min, by_steps.b_noise, by_samples.b_noise, (1 + ZHANG_MARGIN) * batch_sizes[0] + ZHANG_MARGIN
        * joint.b_noise, zhang_measured(batch_sizes, steps), interval, refused)


def _bootstrap(runs: Sequence[Branch], batch_sizes: Sequence[int], seeds: Sequence[int], count: int, rng_seed: int
               ) -> tuple[tuple[float, float] | None, int]:
    """2.5 and 97.5 percentiles of the joint ``B_noise`` over ``count`` resamples of the seeds
    (None without resamples or when every one was refused), and how many were refused."""
    if count <= 0:
        return None, 0
    rng = np.random.default_rng(rng_seed)
    values, refused = [], 0
    for _ in range(count):
        pick = [seeds[i] for i in rng.integers(0, len(seeds), len(seeds))]
        try:
            values.append(fit_tradeoff(batch_sizes, [s for _, s, _ in _per_batch(runs, batch_sizes, pick)]).b_noise)
        except CriticalBatchError:
            refused += 1
    if not values:
        return None, refused
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high)), refused


def measure_critical_batch(problem: BranchProblem, checkpoints: Sequence[Any], batch_sizes: Sequence[int],
                           lrs: Sequence[float] | Mapping[int, Sequence[float]] | Callable[[int], Sequence[float]],
                           drop: float | Sequence[float], *, seeds: Sequence[int] = (0, 1), max_steps: int = 1000,
                           spacing: float = 0.05, bootstrap: int = 200, map: Callable[..., Iterable[Branch]] = map,
                           ) -> list[CheckpointResult]:
    """The critical batch size at each checkpoint (module docstring): branches at every batch
    size, learning rate and seed, the best learning rate per batch size, and the fits.

    Args:
      problem: the model behind the ``BranchProblem`` protocol (restore, step, loss, batches).
      checkpoints: what ``problem.restore`` takes, e.g. taken at points spread over one run.
      batch_sizes: at least 2 distinct sizes; spanning the noise scale (from well below to
        well above it) is what makes the fit informative.
      lrs: the learning-rate grid (one for all batch sizes, per batch size, or a function of the
        batch size: a scaling rule); the best of the grid is used per batch size.
      drop: the loss drop from each checkpoint's evaluation loss that every branch must reach.
      seeds: the data orders each branch is repeated over (the bootstrap resamples them).
      max_steps: the most steps a branch runs; one that has not reached the drop by then has none.
      spacing: evaluations after steps 1, 2, ... then every ``floor(spacing * k)`` steps.
      bootstrap: resamples of the seeds for the interval of ``b_noise`` (0: none).
      map: how to run the branches (see ``measure_branches``).

    Raises CriticalBatchError when an argument is unusable, when a batch size reaches the drop
    with no learning rate in every seed, or when a fit is refused: exact or refused, nothing is
    left out silently. ``measure_branches`` and ``analyse_checkpoint`` are the two halves, for
    keeping the branches of a checkpoint that is refused.
    """
    starts, drops, runs = measure_branches(problem, checkpoints, batch_sizes, lrs, drop, seeds=seeds,
                                           max_steps=max_steps, spacing=spacing, map=map)
    results = []
    for k, (start, d) in enumerate(zip(starts, drops)):
        try:
            results.append(analyse_checkpoint([r for r in runs if r.checkpoint == k], start, d, bootstrap=bootstrap))
        except CriticalBatchError as error:
            raise CriticalBatchError(f"checkpoint {k}: {error}") from None
    return results
