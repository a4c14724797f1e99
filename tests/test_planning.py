"""Micro-batch plans and out-of-memory probing (the first pieces of memory planning)."""

from __future__ import annotations

import sys

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


@pytest.fixture
def frees(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The probe's release of memory, recorded instead of run (a full garbage collection per failed
    try takes seconds in a large test session): each test checks that it followed every failed try."""
    from gradaccum.torch import _memory

    calls: list[int] = []
    monkeypatch.setattr(_memory, "_free_memory", lambda: calls.append(1))
    return calls


@pytest.mark.slow
def test_probing_respects_max_size_and_runtime_oom_messages(frees: list[int]) -> None:
    failed: list[int] = []

    def step(m: int) -> None:
        if m > 300:
            failed.append(m)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate ... out of memory")

    assert find_micro_batch_size(step, 8, max_size=100) == 100
    assert find_micro_batch_size(step, 8) == 300
    assert len(frees) == len(failed) > 0


def test_other_errors_propagate_and_arguments_are_checked() -> None:
    def broken(m: int) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        find_micro_batch_size(broken, 4)
    with pytest.raises(ValueError, match="start must be a positive int"):
        find_micro_batch_size(lambda m: None, 0)
    with pytest.raises(ValueError, match=r"max_size \(2\) must be >= start \(4\)"):
        find_micro_batch_size(lambda m: None, 4, max_size=2)


def _allocate(m: int) -> None:
    """A step whose memory grows with m: 4 MiB per sample, twice over."""
    x = torch.ones(m, 1 << 20)
    (x * 2).sum()


@pytest.mark.slow
def test_cpu_memory_budget_is_measured_and_respected() -> None:
    from gradaccum.torch import measure_peak_memory

    budget = 120 * 2**20
    m = find_micro_batch_size(_allocate, 1, max_memory=budget)
    assert measure_peak_memory(_allocate, m) <= budget < measure_peak_memory(_allocate, m + 1)
    assert 8 <= m <= 15  # about 8 MiB per sample, plus what the child's interpreter touches


def test_measured_child_reports_out_of_memory_and_propagates_other_errors() -> None:
    from gradaccum.torch import measure_peak_memory

    def oom(m: int) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")

    def broken(m: int) -> None:
        raise KeyError("bad batch")

    assert measure_peak_memory(oom, 4) is None
    with pytest.raises(KeyError, match="bad batch"):
        measure_peak_memory(broken, 4)


def test_spiking_network_gradient_is_the_same_at_micro_batch_1_4_16() -> None:
    """The memory proof's exactness half, in float64: one window of 16, three ways."""
    from gradaccum.experiments.snn import SpikingClassifier

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 40, generator=g, dtype=torch.float64) * 2, torch.randint(0, 10, (16,), generator=g)
    seen = {}
    for micro in (1, 4, 16):
        torch.manual_seed(0)
        model = SpikingClassifier(hidden=32, steps=12).double()
        opt = GradCapture(model.parameters())
        acc = Accumulator(model, opt, FixedSteps(16 // micro))
        for i in range(0, 16, micro):
            acc.backward(torch.nn.functional.cross_entropy(model(x[i:i + micro]), y[i:i + micro]), micro)
        seen[micro] = opt.seen[0]
    assert any(float(g.abs().max()) > 0 for g in seen[16])
    for micro in (1, 4):
        assert_grads_close(seen[micro], seen[16])


@pytest.mark.slow
def test_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    from gradaccum.cli import main

    assert main(["plan", "--model", "tests.test_planning:_allocate", "--effective-batch", "40",
                 "--max-memory", "120", "--probes", "2"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch" in out and "FixedSteps(" in out
    assert "2 probes" in out and "depends on this machine's state" in out  # the probe's spread, said
    assert main(["plan", "--model", "nope", "--max-memory", "100"]) == 2
    assert "model must be one of mlp, snn or module:function" in capsys.readouterr().err
    assert main(["plan", "--max-memory", "0"]) == 2
    assert "max_memory must be a positive finite number of MiB" in capsys.readouterr().err


def test_lr_scaling_helper() -> None:
    from gradaccum import lr_factor

    assert lr_factor("linear", 256, 64) == 4.0 and lr_factor("sqrt", 256, 64) == 2.0
    with pytest.raises(ValueError, match="lr_scaling must be one of 'linear', 'sqrt'"):
        lr_factor("cubic", 256, 64)
    with pytest.raises(ValueError, match="reference_batch must be a positive int"):
        lr_factor("linear", 256, 0)


@pytest.mark.slow
def test_plan_accumulation_in_one_call_and_budget_checks(frees: list[int]) -> None:
    from gradaccum.torch import plan_accumulation

    failed: list[int] = []

    def step(m: int) -> None:
        if m > 96:
            failed.append(m)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    assert plan_accumulation(step, 256) == [96, 96, 64]
    assert plan_accumulation(step, 64) == [64]
    assert len(frees) == len(failed) > 0
    with pytest.raises(ValueError, match="max_memory must be a positive int"):
        find_micro_batch_size(step, 1, max_memory=0)
    with pytest.raises(ValueError, match="effective_batch must be a positive int"):
        plan_accumulation(step, 0)


@pytest.mark.slow
def test_probe_leaves_no_gradients_and_the_accumulator_names_stale_ones(frees: list[int]) -> None:
    """Memory planning ran backward passes on the model; the Accumulator built afterwards
    then refused every backward with a misleading "stray backward" message."""
    from gradaccum import FixedSteps
    from gradaccum.torch import Accumulator, find_micro_batch_size

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    failed: list[int] = []

    def step(m: int) -> None:
        if m > 8:
            failed.append(m)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        model(torch.randn(m, 3)).sum().backward()

    assert find_micro_batch_size(step, 1, 16) == 8
    with pytest.raises(ValueError, match=r"already hold gradients \(weight, bias\).*zero_grad\(set_to_none=True\)"):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(2))
    model.zero_grad(set_to_none=True)
    assert find_micro_batch_size(step, 1, 16, model=model) == 8
    assert all(p.grad is None for p in model.parameters())
    Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(2))
    assert len(frees) == len(failed) > 0


@pytest.mark.parametrize("error", [RuntimeError("failed to allocate a port for the logger"),
                                   RuntimeError("the cache is out of slots"),
                                   ValueError("CUDA out of memory"),
                                   OSError(12, "Cannot allocate memory")])
def test_only_real_out_of_memory_errors_count_as_out_of_memory(error: BaseException) -> None:
    """A step's own error that mentioned "failed to allocate" was taken for memory running out."""
    from gradaccum.torch import is_out_of_memory

    assert not is_out_of_memory(error)

    def step(m: int) -> None:
        if m > 4:
            raise error

    with pytest.raises(type(error), match=str(error.args[-1])):
        find_micro_batch_size(step, 1)


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB",
                                     "CUDA error: out of memory", "MPS backend out of memory (MPS allocated: 1 GB)",
                                     "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                     "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"])
def test_allocator_messages_count_as_out_of_memory(message: str) -> None:
    from gradaccum.torch import is_out_of_memory

    assert is_out_of_memory(RuntimeError(message))


@pytest.mark.parametrize("where", ["here", "child"])
def test_a_step_calling_sys_exit_raises_instead_of_exiting_the_caller(where: str) -> None:
    """``sys.exit`` in the probed step exited the program with no message."""
    from gradaccum.torch._memory import ProbeError

    def step(m: int) -> None:
        if m > 2:
            sys.exit(3)

    budget = {"max_memory": 1 << 40} if where == "child" else {}
    with pytest.raises(ProbeError, match=r"step\(4\) called sys.exit\(3\) during the memory probe"):
        find_micro_batch_size(step, 1, 64, **budget)


@pytest.mark.slow
def test_a_crashing_step_is_not_taken_for_out_of_memory() -> None:
    """A step that segfaulted its probe's child counted as "does not fit"."""
    import os
    import signal

    from gradaccum.torch._memory import ProbeError

    def step(m: int) -> None:
        if m > 2:
            os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(ProbeError, match=r"step\(4\) crashed the probe's child process with signal SIGSEGV"):
        find_micro_batch_size(step, 1, 64, max_memory=1 << 40)

    def killed(m: int) -> None:  # the out-of-memory killer's SIGKILL is "does not fit"
        if m > 2:
            os.kill(os.getpid(), signal.SIGKILL)

    assert find_micro_batch_size(killed, 1, 64, max_memory=1 << 40) == 2


@pytest.mark.slow
@pytest.mark.parametrize("where", ["here", "child"])
def test_a_step_that_never_returns_times_out(where: str) -> None:
    """A hanging step blocked the probe forever."""
    import threading
    import time

    from gradaccum.torch._memory import ProbeError

    release = threading.Event()

    def step(m: int) -> None:
        if m > 2:
            if where == "here":
                release.wait(60)
            else:
                time.sleep(60)

    budget = {"max_memory": 1 << 40} if where == "child" else {}
    start = time.monotonic()
    try:
        with pytest.raises(ProbeError, match=r"step\(4\) did not return within timeout=0.5 s"):
            find_micro_batch_size(step, 1, 64, timeout=0.5, **budget)
    finally:
        release.set()
    assert time.monotonic() - start < 20
    with pytest.raises(ValueError, match="timeout must be a positive finite number of seconds"):
        find_micro_batch_size(step, 1, 64, timeout=0)


def test_plan_says_when_not_even_a_micro_batch_of_1_fits(capsys: pytest.CaptureFixture[str]) -> None:
    """It ended in a traceback advising "try a smaller start" when the start was already 1."""
    from gradaccum.cli import main

    assert main(["plan", "--model", "tests.test_planning:_allocate", "--max-memory", "1", "--probes", "1"]) == 2
    err = capsys.readouterr().err
    assert "max_memory: even a micro-batch of 1 does not fit in 1 MiB (it needs" in err and "raise --max-memory" in err
    assert "smaller start" not in err
