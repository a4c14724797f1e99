"""Accelerate: a window through a prepared model, optimizer and scheduler equals the
full-batch step in float64, the scheduler steps once per window, a planner's windows agree with
the optimizer's step count, and accelerator.save_state / load_state keep the partial window."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from gradaccum import BatchRamp, FixedSteps, NoiseScalePlanner
from gradaccum.integrations.accelerate import accumulator

from .test_micro_batch import micro_batch_terms


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: each test starts from a clean one."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def test_a_window_through_accelerate_equals_the_full_batch_step_in_float64() -> None:
    x, y = data()
    model, optimizer, scheduler = build()
    reference, ref_opt, ref_sched = copy.deepcopy(model), None, None
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 1.0 / (1 + step))
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    acc = accumulator(accelerator, model, optimizer, FixedSteps(3), scheduler=scheduler)
    sizes = [5, 3, 4]  # uneven micro-batches: the window is the mean over its 12 items
    for window in range(4):
        start = 12 * window
        for a, b in zip([0, 5, 8], [5, 8, 12]):
            xb, yb = x[start + a:start + b], y[start + a:start + b]
            acc.backward(nn.functional.cross_entropy(model(xb), yb), len(yb))
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(x[start:start + 12]), y[start:start + 12]).backward()
        ref_opt.step()
        ref_sched.step()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-14)
    assert sum(sizes) == 12 and acc.steps == 4
    assert scheduler.scheduler.last_epoch == 4  # once per window, not once per micro-batch or process
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 5)


def test_a_planner_sets_the_windows_and_the_counts_agree() -> None:
    x, y = data(160)
    model, optimizer, scheduler = build()
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    acc = accumulator(accelerator, model, optimizer, BatchRamp(8, 32, over=96, micro_batch=8), scheduler=scheduler)
    for a in range(0, 160, 8):
        acc.backward(nn.functional.cross_entropy(model(x[a:a + 8]), y[a:a + 8]), 8)
    acc.flush()
    sizes = [r.items for r in acc.history]
    assert sizes[0] == 8 and max(sizes) == 32 and sum(sizes) == 160
    adam_steps = {int(s["step"]) for s in optimizer.optimizer.state.values()}
    assert adam_steps == {len(sizes)} and scheduler.scheduler.last_epoch == len(sizes)


def test_a_noise_scale_planner_on_the_micro_batch_source_measures_the_micro_batches() -> None:
    """NoiseScalePlanner(source="micro_batch") through the prepared model and optimizer: the first
    window's terms equal a float64 loop over its two micro-batches' gradients, every planned window
    has two or more micro-batches and finite terms, and each plan is the planner's own."""
    x, y = data(96)
    model, optimizer, scheduler = build()
    initial = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    planner = NoiseScalePlanner(1.0, min_batch=8, max_batch=32, micro_batch=4, source="micro_batch")
    acc = accumulator(accelerator, model, optimizer, planner, scheduler=scheduler, clip_grad_norm=0.5)
    for a in range(0, 96, 4):
        acc.backward(nn.functional.cross_entropy(model(x[a:a + 4]), y[a:a + 4]), 4)
    acc.flush()
    first = acc.history[0]
    trace, squared, n = micro_batch_terms(initial, [(x[0:4], y[0:4]), (x[4:8], y[4:8])])
    assert first.micro_batches == 2 and first.info["samples"] == n == 8
    assert first.info["trace"] == pytest.approx(trace, rel=1e-10)
    assert first.info["squared_norm"] == pytest.approx(squared, rel=1e-9, abs=1e-12 * trace)
    planned = [r for r in acc.history if r.reason == "rule"]
    assert len(planned) >= 3 and all(r.micro_batches >= 2 and math.isfinite(r.info["trace"]) for r in planned)
    for w in range(1, len(planned)):
        assert acc.history[w].micro_batches == planner.plan(acc.history[:w])


def test_save_state_and_load_state_keep_the_partial_window(tmp_path) -> None:
    x, y = data(40)

    def setup():
        model, optimizer, scheduler = build()
        accelerator = Accelerator(cpu=True)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        acc = accumulator(accelerator, model, optimizer, FixedSteps(3), scheduler=scheduler)
        accelerator.register_for_checkpointing(acc)
        return accelerator, model, acc

    def feed(model, acc, parts):
        for a in parts:
            acc.backward(nn.functional.cross_entropy(model(x[a:a + 4]), y[a:a + 4]), 4)

    accelerator, model, acc = setup()
    feed(model, acc, range(0, 40, 4))
    whole = [p.detach().clone() for p in model.parameters()]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator, model, acc = setup()
    feed(model, acc, range(0, 20, 4))  # one window and two micro-batches of the next
    accelerator.save_state(str(tmp_path / "ckpt"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator, model, acc = setup()
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert acc.window_micro_batches == 2
    feed(model, acc, range(20, 40, 4))
    for ours, theirs in zip(model.parameters(), whole):
        assert torch.equal(ours, theirs)


def test_what_cannot_work_is_refused_by_name() -> None:
    model, optimizer, _ = build()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        accumulator(accelerator, model, optimizer, FixedSteps(2))
    accelerator.gradient_accumulation_steps = 1
    with pytest.raises(ValueError, match="scaler"):
        accumulator(accelerator, model, optimizer, FixedSteps(2), scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.slow
def test_two_gloo_processes_through_accelerate_equal_one_process(tmp_path) -> None:
    """Accelerate's MULTI_CPU DDP: each rank's uneven micro-batches, one window the union of both."""
    from . import _ddp_worker as worker
    from .reference import full_batch_grad, mlp
    from .test_ddp import run_two_ranks, windows_of

    ranks = run_two_ranks(tmp_path, "accelerate")
    assert [r["distributed"] for r in ranks] == ["MULTI_CPU"] * 2 and ranks[0]["type"] == "DistributedDataParallel"
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [worker.rank_data(r) for r in range(2)]
    windows = [windows_of(worker.SIZES[r], worker.K) for r in range(2)]
    for w in range(len(windows[0])):
        x = torch.cat([data[r].x[windows[r][w]] for r in range(2)])
        y = torch.cat([data[r].y[windows[r][w]] for r in range(2)])
        optimizer.zero_grad()
        for p, g in zip(model.parameters(), full_batch_grad(model, type(data[0])(x, y))):
            p.grad = g
        optimizer.step()
    for r in range(2):
        for got, want in zip(ranks[r]["params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
