"""Micro-batch plans and out-of-memory probing (the first pieces of memory planning)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradaccum import FixedSteps, plan_micro_batches
from gradaccum.torch import Accumulator, find_micro_batch_size

from .reference import (
    GradCapture,
    ce_mean,
    classification,
    full_batch_grad,
    mlp,
    split,
    take,
)
from .test_exactness import assert_grads_close


@settings(max_examples=200, deadline=None)
@given(effective=st.integers(1, 600), micro=st.integers(1, 80), world=st.integers(1, 8))
def test_plans_add_up_to_the_effective_batch(effective: int, micro: int, world: int) -> None:
    if effective < world:
        with pytest.raises(ValueError, match="effective_batch .* must be >= world_size"):
            plan_micro_batches(effective, micro, world)
        return
    per_rank = [effective // world + (r < effective % world) for r in range(world)]
    if min(per_rank) < -(-max(per_rank) // micro):  # some rank cannot fill as many micro-batches
        with pytest.raises(ValueError, match="cannot give every rank"):
            plan_micro_batches(effective, micro, world)
        return
    plans = plan_micro_batches(effective, micro, world)
    assert len(plans) == world
    assert sum(sum(p) for p in plans) == effective
    assert len({len(p) for p in plans}) == 1  # every rank calls backward as often
    assert all(1 <= s <= micro for p in plans for s in p)


def test_named_plans() -> None:
    assert plan_micro_batches(100, 48) == [[48, 48, 4]]
    assert plan_micro_batches(64, 64) == [[64]] and plan_micro_batches(64, 1) == [[1] * 64]


@pytest.mark.parametrize(("args", "match"), [((0, 8), "effective_batch must be a positive int"),
                                             ((64, 0), "micro_batch must be a positive int"),
                                             ((64, 8, 0), "world_size must be a positive int"),
                                             ((64, 8.0), "micro_batch must be a positive int")])
def test_bad_plan_arguments(args, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        plan_micro_batches(*args)


@pytest.mark.parametrize("sizes", [[12], [5, 5, 2], [1] * 12])
def test_planned_micro_batches_give_the_full_batch_gradient(sizes) -> None:
    data = classification(12)
    model = mlp()
    want = full_batch_grad(model, data)
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(len(sizes)))
    for sl in split(12, sizes):
        acc.backward(*ce_mean(model, take(data, sl)))
    assert_grads_close(opt.seen[0], want)


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(1, 5000), start=st.integers(1, 64))
def test_probing_finds_exactly_the_largest_size_that_fits(limit: int, start: int) -> None:
    from gradaccum.torch import _memory

    tried: list[int] = []
    freed: list[int] = []

    def step(m: int) -> None:
        tried.append(m)
        if m > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    original, _memory._free_memory = _memory._free_memory, lambda: freed.append(tried[-1])
    try:
        _check_probe(step, start, limit, tried)
    finally:
        _memory._free_memory = original
    assert freed == [m for m in tried if m > limit]  # memory is freed after every failed try


def _check_probe(step, start: int, limit: int, tried: list[int]) -> None:
    if start > limit:
        with pytest.raises(RuntimeError, match=f"micro-batch start={start} does not fit"):
            find_micro_batch_size(step, start)
        return
    assert find_micro_batch_size(step, start) == limit
    assert len(tried) <= 2 * (limit.bit_length() + 2)  # doubling, then binary search


def test_probing_respects_max_size_and_runtime_oom_messages() -> None:
    def step(m: int) -> None:
        if m > 300:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate ... out of memory")

    assert find_micro_batch_size(step, 8, max_size=100) == 100
    assert find_micro_batch_size(step, 8) == 300


def test_other_errors_propagate_and_arguments_are_checked() -> None:
    def broken(m: int) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        find_micro_batch_size(broken, 4)
    with pytest.raises(ValueError, match="start must be a positive int"):
        find_micro_batch_size(lambda m: None, 0)
    with pytest.raises(ValueError, match=r"max_size \(2\) must be >= start \(4\)"):
        find_micro_batch_size(lambda m: None, 4, max_size=2)
