"""The planners' running summary (``PlanFold``): bitwise ``summarize`` of the same history, and a
close folds one record, not the whole history."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradaccum import BatchRamp, GSNRPlanner, NoiseScalePlanner, NormTestPlanner, StepRecord
from gradaccum._core import planners
from gradaccum._core.noise_scale import NoiseScaleEMA
from gradaccum._core.planners import PlanFold, summarize
from gradaccum.torch import Accumulator

from .reference import ce_mean, classification, mlp, take


def history(n: int, seed: int = 0) -> list[StepRecord]:
    """Windows of every kind the summary reads: measured, skipped, NaN trace (nothing measured),
    with a GSNR, and without noise terms."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        kind = rng.integers(0, 5)
        info: dict = {}
        if kind in (0, 1, 2):
            info = {"trace": float(rng.uniform(0.1, 10)), "squared_norm": float(rng.uniform(-0.5, 2))}
        if kind == 1:
            info.update(gsnr=float(rng.uniform(0, 3)), samples=int(rng.integers(2, 64)))
        if kind == 3:
            info = {"trace": math.nan, "squared_norm": math.nan}
        out.append(StepRecord(step=k, items=int(rng.integers(1, 100)), micro_batches=1, skipped=bool(kind == 2),
                              reason="rule", info=info))
    return out


@pytest.mark.parametrize("every", [1, 3])
def test_each_prefix_is_summarize_of_it_bitwise(every: int) -> None:
    records = history(40)
    fold = PlanFold(0.8, every)
    for n in range(len(records) + 1):
        assert fold(records[:n]) == summarize(records[:n], 0.8, every), n
    # a pending record (the window being closed) counts as the history's last
    fold = PlanFold(0.8, every)
    for n in range(len(records)):
        assert fold(records[:n], records[n]) == summarize(records[:n + 1], 0.8, every), n


def test_a_history_that_does_not_extend_the_last_one_is_folded_anew() -> None:
    records, other = history(30, seed=1), history(30, seed=2)
    fold = PlanFold(0.9, 2)
    fold(records[:20])
    # a restored history (other records), a shorter one, a failed close's record never appended
    assert fold(other[:25]) == summarize(other[:25], 0.9, 2)
    assert fold(other[:10]) == summarize(other[:10], 0.9, 2)
    fold(other[:10], records[10])
    assert fold(other[:10], other[10]) == summarize(other[:11], 0.9, 2)
    assert fold([]) == summarize([], 0.9, 2)


@pytest.mark.parametrize("planner", [
    NoiseScalePlanner(1.0, min_batch=4, max_batch=64, micro_batch=4, every=2, decay=0.7),
    NormTestPlanner(0.5, min_batch=4, max_batch=64, micro_batch=4),
    GSNRPlanner(2.0, min_batch=4, max_batch=64, micro_batch=4),
    BatchRamp(4, 64, 2000, micro_batch=4),
], ids=lambda p: type(p).__name__)
def test_the_plan_from_the_fold_is_the_plan_from_the_history(planner) -> None:
    records = history(50, seed=3)
    fold = planner.fold()
    for n in range(len(records) + 1):
        assert int(planner.plan_from(fold(records[:n]))) == planner.plan(records[:n])


def test_an_accumulator_folds_each_record_once_and_plans_as_the_planner_does(monkeypatch) -> None:
    """Over 60 windows the moving average is updated once per measured window, not once per
    window per close (summarize at every close: 60 * 61 / 2 updates); the plans equal
    ``planner.plan`` of each prefix of the history."""
    updates = []
    update = NoiseScaleEMA.update

    def counted(self, averages, values):
        updates.append(1)
        return update(self, averages, values)

    data = classification(4000, seed=0)
    model = mlp()
    planner = NoiseScalePlanner(1.0, min_batch=8, max_batch=32, micro_batch=8)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), planner)
    monkeypatch.setattr(NoiseScaleEMA, "update", counted)
    start = 0
    while len(acc.history) < 60:
        acc.backward(*ce_mean(model, take(data, slice(start, start + 8))))
        start = (start + 8) % 3992
    monkeypatch.setattr(NoiseScaleEMA, "update", update)
    measured = sum("trace" in r.info and not r.skipped and math.isfinite(r.info["trace"]) for r in acc.history)
    assert measured > 30
    assert len(updates) <= len(acc.history)
    for n in range(1, len(acc.history)):
        assert acc.history[n].micro_batches == planner.plan(acc.history[:n]), n


def test_summarize_is_unchanged_for_a_users_planner() -> None:
    """A planner without ``fold`` is asked ``plan(history)`` at every close, with the whole history."""
    seen: list[int] = []

    class Alternating:
        needs_statistics = False

        def plan(self, records):
            seen.append(len(records))
            return 1 + len(records) % 2

    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), Alternating())
    data = classification(64, seed=1)
    for i in range(8):
        acc.backward(*ce_mean(model, take(data, slice(8 * i, 8 * i + 8))))
    assert [r.micro_batches for r in acc.history] == [1 + k % 2 for k in range(len(acc.history))]
    assert seen[0] == 0 and seen[1:] == list(range(1, len(seen)))
    assert planners.summarize is summarize


def test_an_interrupted_fold_leaves_the_fold_as_it_was(monkeypatch) -> None:
    """A refold stopped half-way (Ctrl-C in a close, retried by flush()) must not count the
    records it folded before the interruption twice."""
    records = history(30, seed=4)
    fold = PlanFold(0.9, 1)
    fold(records[:10])
    update = NoiseScaleEMA.update
    calls = []

    def interrupted(self, averages, values):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return update(self, averages, values)

    monkeypatch.setattr(NoiseScaleEMA, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fold(records[:29], records[29])
    monkeypatch.setattr(NoiseScaleEMA, "update", update)
    assert fold(records[:29], records[29]) == summarize(records, 0.9, 1)
    # and after a restored history (a refold from the start) interrupted the same way
    other = history(30, seed=5)
    calls.clear()
    monkeypatch.setattr(NoiseScaleEMA, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fold(other)
    monkeypatch.setattr(NoiseScaleEMA, "update", update)
    assert fold(other) == summarize(other, 0.9, 1)


def test_a_subclass_with_its_own_plan_is_asked_at_every_close() -> None:
    class Warmup(NoiseScalePlanner):
        def plan(self, records):
            return 1 if len(records) < 5 else 3

    planner = Warmup(1.0, min_batch=8, max_batch=64, micro_batch=8, source="per_sample")
    assert planner.fold() is None
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), planner)
    data = classification(400, seed=2)
    start = 0
    while len(acc.history) < 8:
        acc.backward(*ce_mean(model, take(data, slice(start, start + 8))))
        start += 8
    assert [r.micro_batches for r in acc.history] == [1] * 5 + [3] * 3


def test_a_planner_set_on_the_accumulator_later_plans_with_its_own_fold() -> None:
    first = NoiseScalePlanner(0.1, min_batch=8, max_batch=256, micro_batch=8, source="per_sample", decay=0.99)
    second = NoiseScalePlanner(0.3, min_batch=8, max_batch=256, micro_batch=8, source="per_sample", decay=0.1)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), first)
    data = classification(8000, seed=3)
    start, switched = 0, None
    while len(acc.history) < 16:
        if len(acc.history) == 4 and switched is None:
            acc.planner = acc.rule = second
            switched = len(acc.history)
        acc.backward(*ce_mean(model, take(data, slice(start, start + 8))))
        start += 8
    for n in range(switched + 1, len(acc.history)):
        assert acc.history[n].micro_batches == second.plan(acc.history[:n]), n
