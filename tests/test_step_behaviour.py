"""Scheduler, GradScaler, clipping and the non-finite policy behave as in one big batch."""

from __future__ import annotations

import pytest
import torch

from gradaccum import FixedSteps
from gradaccum.torch import Accumulator, NonFiniteError

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


def feed(acc: Accumulator, model, data, sizes) -> list[bool]:
    out = []
    for sl in split(len(data), sizes):
        loss, count = ce_mean(model, take(data, sl))
        out.append(acc.backward(loss, count))
    return out


def test_scheduler_steps_once_per_optimizer_step() -> None:
    """Accelerate #963/#1382: stepping per micro-batch multiplies the schedule's speed."""
    data = classification(40)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    acc = Accumulator(model, opt, FixedSteps(4), scheduler=sched)
    feed(acc, model, data, [2] * 18 + [4])  # 4 full windows + 3 micro-batches left
    acc.flush()
    assert sched.last_epoch == 5
    assert [r.lr[0] for r in acc.history] == [1.0, 0.5, 0.25, 0.125, 0.0625]


def test_clipping_acts_on_the_whole_accumulated_gradient() -> None:
    data = classification(12)
    model, big = mlp(), mlp()
    max_norm = 0.05
    # one big batch, clipped
    loss, _ = ce_mean(big, data)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(big.parameters(), max_norm)
    want = [p.grad.clone() for p in big.parameters()]
    # accumulated, clipped once per window
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(3), clip_grad_norm=max_norm)
    feed(acc, model, data, [1, 5, 6])
    assert_grads_close(opt.seen[0], want)
    assert acc.history[0].grad_norm == pytest.approx(float(norm), rel=1e-12)
    # per-micro-batch clipping would have given something else on this problem
    per_mb = [torch.zeros_like(p) for p in big.parameters()]
    for sl in split(12, [1, 5, 6]):
        big.zero_grad()
        part = take(data, sl)
        (ce_mean(big, part)[0] * len(part) / 12).backward()
        torch.nn.utils.clip_grad_norm_(big.parameters(), max_norm / 3)
        for a, p in zip(per_mb, big.parameters()):
            a += p.grad
    assert max(float((a - b).abs().max()) for a, b in zip(per_mb, want)) > 1e-4


def test_grad_scaler_finite_path_is_exact_and_unscales_once() -> None:
    data = classification(10)
    model = mlp()
    want = full_batch_grad(model, data)
    opt = GradCapture(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(model, opt, FixedSteps(3), scaler=scaler)
    assert feed(acc, model, data, [3, 3, 4]) == [False, False, True]
    assert_grads_close(opt.seen[0], want)  # unscaled exactly once
    assert not acc.history[0].skipped


def test_grad_scaler_skips_step_and_scheduler_on_inf() -> None:
    data = classification(16)
    model = mlp().float()
    data.x = data.x.float() * 100  # large inputs: scaled first-layer gradients overflow float32
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e38)
    acc = Accumulator(model, opt, FixedSteps(2), scheduler=sched, scaler=scaler)
    assert feed(acc, model, take(data, slice(0, 8)), [4, 4]) == [False, False]  # closed, not stepped
    record = acc.history[0]
    assert record.skipped is True
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 0.1
    assert scaler.get_scale() < 1e38
    # the scale keeps falling until a window is finite, then training proceeds
    for _ in range(200):
        feed(acc, model, take(data, slice(8, 16)), [4, 4])
        if not acc.last_record.skipped:
            break
    assert not acc.last_record.skipped
    assert sched.last_epoch == 1
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _nan_grad_loss(model, part):
    """A finite loss whose gradient is NaN: NaN inputs masked out by torch.where."""
    x = part.x.clone()
    x[0] = float("nan")
    out = model(x)
    keep = torch.ones(len(x), 1, dtype=torch.bool)
    keep[0] = False
    out = torch.where(keep, out, torch.zeros_like(out))
    return torch.nn.functional.cross_entropy(out, part.y)


@pytest.mark.parametrize("foreach_below", [1 << 20, 0], ids=["flagging_kernel", "sums"])
@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_nonfinite_raise_leaves_window_intact(bad: str, foreach_below: int, monkeypatch) -> None:
    from gradaccum.torch import _nonfinite

    monkeypatch.setattr(_nonfinite, "_FLAGGED_UP_TO", foreach_below)
    data = classification(12)
    model = mlp()
    good = take(data, slice(0, 8))
    want = full_batch_grad(model, good)
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(2))
    feed(acc, model, take(data, slice(0, 4)), [4])
    part = take(data, slice(8, 12))
    loss = ce_mean(model, part)[0] * float("inf") if bad == "loss" else _nan_grad_loss(model, part)
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient"):
        acc.backward(loss, 4)
    assert acc.window_items == 4 and acc.window_micro_batches == 1
    assert all(p.grad is None for p in model.parameters())
    feed(acc, model, take(data, slice(4, 8)), [4])
    assert_grads_close(opt.seen[0], want)


def test_nonfinite_skip_micro_batch_drops_only_its_items() -> None:
    data = classification(12)
    model = mlp()
    want = full_batch_grad(model, take(data, slice(0, 8)))
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(3), nonfinite="skip_micro_batch")
    feed(acc, model, take(data, slice(0, 4)), [4])
    assert acc.backward(_nan_grad_loss(model, take(data, slice(8, 12))), 4) is False
    assert feed(acc, model, take(data, slice(4, 8)), [4]) == [True]
    assert acc.history[0].items == 8 and acc.history[0].micro_batches == 3
    assert_grads_close(opt.seen[0], want)


def test_step_record_is_loggable() -> None:
    data = classification(8)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(2), clip_grad_norm=10.0)
    feed(acc, model, data, [3, 5])
    record = acc.last_record.as_dict()
    assert record["step"] == 0 and record["items"] == 8 and record["micro_batches"] == 2
    assert record["skipped"] is False and record["reason"] == "rule"
    assert record["lr"] == [0.1] and record["grad_norm"] > 0 and record["info"] == {}


def test_keep_history_false_keeps_last_record_only() -> None:
    data = classification(8)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(1), keep_history=False)
    feed(acc, model, data, [4, 4])
    assert acc.history == [] and acc.last_record.step == 1 and acc.steps == 2


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_nonfinite_skip_window_skips_only_that_window(bad: str) -> None:
    """In place, a NaN loss is caught per micro-batch, a NaN gradient when the window closes."""
    data = classification(12)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(2), nonfinite="skip_window")
    feed(acc, model, take(data, slice(0, 4)), [4])
    part = take(data, slice(4, 8))
    loss = ce_mean(model, part)[0] * float("nan") if bad == "loss" else _nan_grad_loss(model, part)
    assert acc.backward(loss, 4) is False
    assert acc.history[0].skipped and acc.history[0].reason == "nonfinite" and opt.seen == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    want = full_batch_grad(model, take(data, slice(4, 12)))
    assert feed(acc, model, take(data, slice(4, 12)), [4, 4]) == [False, True]
    assert_grads_close(opt.seen[0], want)
