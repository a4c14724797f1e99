"""The step, the loop around it and failures at the close: exact or refused, and a failed call changes nothing.

A leftover ``optimizer.step()`` or ``optimizer.zero_grad()`` in the training loop, a loss of
another model, a planner or an optimizer that raises at the close, an ``lr_schedule`` that
returns a NumPy scalar: each either gives the run without it, bitwise, or raises naming the
fix, with the window, the parameters and the learning rate as they were.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradaccum import GSNR, BatchRamp, FixedSteps
from gradaccum.torch import Accumulator

from .reference import GradCapture, ce_mean, classification, mlp, take
from .test_faults import same_window, window_of

DATA = classification(24)
MODES = [dict(nonfinite="raise"), dict(nonfinite="skip_micro_batch"), dict(nonfinite="skip_window"),
         dict(nonfinite="skip_window", rule=GSNR(1e9, increment=4, max_samples=8))]
MODE_IDS = ["raise", "skip_micro_batch", "skip_window_in_grad", "skip_window_statistics"]


def build(mode: dict, optimizer=GradCapture, **kwargs):
    model = mlp()
    opt = optimizer(model.parameters())
    settings = {k: v for k, v in mode.items() if k != "rule"}
    return model, opt, Accumulator(model, opt, mode.get("rule", FixedSteps(2)), **settings, **kwargs)


def feed(model, acc, start: int, stop: int):
    return acc.backward(*ce_mean(model, take(DATA, slice(start, stop))))


def straight(mode: dict, **kwargs) -> list:
    """The gradients the optimizer saw in a clean run: windows of micro-batches [0:4]+[4:8], [8:12]+[12:16]."""
    model, opt, acc = build(mode, **kwargs)
    for start in range(0, 16, 4):
        feed(model, acc, start, start + 4)
    return opt.seen


def same_grads(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        all((x is None and y is None) or torch.equal(x, y) for x, y in zip(u, v)) for u, v in zip(a, b))


# ---------------------------------------------------------------------- a loss that is not the model's
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("at", [0, 1], ids=["empty_window", "mid_window"])
def test_a_loss_of_another_model_is_refused_and_changes_nothing(mode: dict, at: int) -> None:
    """A loss that does not involve the model was accepted: its items joined the window and the
    window stepped with no gradient, or with its mean diluted. Now it is refused by name, the
    window is unchanged, and the run goes on to the clean run's gradients."""
    model, opt, acc = build(mode)
    other = mlp(seed=5)
    for start in range(0, 16, 4):
        if start == 4 * at:
            before = window_of(acc)
            params = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(ValueError, match="loss: its backward reached none of the model's parameters"):
                feed(other, acc, start, start + 4)
            assert same_window(acc, before) and acc.window_micro_batches == at
            assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
        feed(model, acc, start, start + 4)
    assert same_grads(opt.seen, straight(mode))


# ---------------------------------------------------------------------- the training loop's leftovers
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_leftover_optimizer_step_mid_window_is_refused_before_it_steps(mode: dict) -> None:
    """With "skip_window" the window's partial sum is in .grad: a leftover optimizer.step()
    stepped with it (unaveraged), silently. The step is refused in every mode while a window is
    open; the parameters and the window are as they were, and the run equals the clean run."""
    model, opt, acc = build(mode)
    for start in range(0, 16, 4):
        stepped = feed(model, acc, start, start + 4)
        if not stepped:
            before, params = window_of(acc), [p.detach().clone() for p in model.parameters()]
            with pytest.raises(RuntimeError, match=r"optimizer.step\(\) was called while the Accumulator's window is "
                                                   r"open .* Remove optimizer.step\(\)"):
                opt.step()
            assert same_window(acc, before)
            assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
        else:
            opt.step()  # no window open: no gradient, nothing moves (the step the loop used to take)
    assert same_grads(opt.seen[::2], straight(mode))  # every other one was the loop's own, of no gradient


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeros"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_zero_grad_mid_window_is_harmless_or_refused(mode: dict, set_to_none: bool) -> None:
    """A leftover optimizer.zero_grad() between backwards emptied the window's sum when it lives
    in .grad ("skip_window" without statistics), silently: the window stepped with its last
    micro-batch only. There it is now refused at the next backward and at the flush, naming the
    fix; where the sum is kept apart, .grad is empty between backwards and the run is the clean one."""
    model, opt, acc = build(mode)
    feed(model, acc, 0, 4)
    opt.zero_grad(set_to_none=set_to_none)
    in_grad = mode == MODES[2]
    if in_grad:
        for call in (lambda: feed(model, acc, 4, 8), acc.flush):
            with pytest.raises(RuntimeError, match="changed outside the Accumulator .* flush\\(drop=True\\)"):
                call()
        assert acc.window_micro_batches == 1 and acc.steps == 0 and opt.seen == []
        acc.flush(drop=True)  # the fix the message names: the next window is clean
        feed(model, acc, 8, 12)
        feed(model, acc, 12, 16)
        model, clean, acc = build(mode)  # the dropped window took no step: its next one starts from the same weights
        feed(model, acc, 8, 12)
        feed(model, acc, 12, 16)
        assert len(opt.seen) == 1 and same_grads(opt.seen, clean.seen)
        return
    for start in range(4, 16, 4):
        feed(model, acc, start, start + 4)
    assert same_grads(opt.seen, straight(mode))


# ---------------------------------------------------------------------- failures at the close
class Flaky:
    """A planner (a ramp) that raises or returns ``bad`` at its ``fail_at``-th call, once."""

    needs_statistics = False

    def __init__(self, fail_at: int, bad=None) -> None:
        self.ramp = BatchRamp(8, 16, over=16, micro_batch=4)
        self.calls, self.fail_at, self.bad = 0, fail_at, bad

    def plan(self, history):
        self.calls += 1
        if self.calls == self.fail_at:
            if self.bad is None:
                raise RuntimeError("planner failed (injected)")
            return self.bad
        return self.ramp.plan(history)


@pytest.mark.parametrize(("bad", "error", "match"), [(None, RuntimeError, "planner failed"),
                                                     (0, ValueError, r"Flaky.plan\(history\).* must be a positive int"),
                                                     (2.5, TypeError, r"must be a positive int, got 2.5")],
                         ids=["raises", "zero", "fractional"])
def test_a_planner_failing_at_the_close_takes_no_step_and_flush_retries_it(bad, error, match) -> None:
    """The planner's next plan was computed after the optimizer stepped: the call raised, the step
    stayed, the window neither recorded nor reset. Now it is validated before the optimizer runs:
    no step, the window kept ready; flush() steps it, no second division, and the run is the
    clean run bitwise."""
    runs = []
    for fail in (False, True):
        model = mlp()
        opt = GradCapture(model.parameters())
        acc = Accumulator(model, opt, Flaky(fail_at=2 if fail else 0, bad=bad))
        feed(model, acc, 0, 4)
        params = [p.detach().clone() for p in model.parameters()]
        if fail:
            with pytest.raises(error, match=match) as raised:
                feed(model, acc, 4, 8)
            assert "no optimizer step was taken" in "\n".join(getattr(raised.value, "__notes__", []))
            assert opt.seen == [] and acc.steps == 0 and acc.history == []
            assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
            with pytest.raises(RuntimeError, match="call flush\\(\\) to retry it"):
                feed(model, acc, 8, 12)  # refused: the window is closing, not open
            with pytest.raises(RuntimeError, match="call flush\\(\\) to retry it"):
                acc.state_dict()
            assert acc.flush() is True
        else:
            assert feed(model, acc, 4, 8) is True
        for start in range(8, 24, 4):
            feed(model, acc, start, start + 4)
        runs.append((opt.seen, [r.as_dict() for r in acc.history], [p.detach() for p in model.parameters()]))
    (seen, history, params), (seen2, history2, params2) = runs
    assert same_grads(seen, seen2) and len(seen) == 2  # windows of 2 and 3 micro-batches
    assert history == history2
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


class StepFailsOnce(GradCapture):
    """SGD whose step raises once, before it touches anything (out of memory, say)."""

    armed = False

    def step(self, closure=None):  # type: ignore[override]
        if StepFailsOnce.armed:
            StepFailsOnce.armed = False
            raise RuntimeError("out of memory (injected, in optimizer.step)")
        return super().step(closure)


@pytest.mark.parametrize("via", ["backward", "flush"])
def test_an_optimizer_step_that_raises_restores_the_lr_and_flush_retries_without_a_second_division(via: str) -> None:
    """optimizer.step raising once under lr_scaling left the lr scaled (0.2 instead of 0.1), and a
    flush() retry divided the window a second time. Now the lr is restored, the error says the
    parameters may be partly updated, and the retry steps the same mean gradient: the run
    equals the clean run bitwise."""
    runs = []
    for fail in (False, True):
        model = mlp()
        opt = StepFailsOnce(model.parameters())
        acc = Accumulator(model, opt, FixedSteps(2), lr_scaling="linear", reference_batch=4)
        feed(model, acc, 0, 4)
        StepFailsOnce.armed = fail
        if fail:
            with pytest.raises(RuntimeError, match="injected") as raised:
                feed(model, acc, 4, 8) if via == "backward" else acc.flush()
            note = "\n".join(raised.value.__notes__)
            assert "parameters and optimizer state may be partly updated" in note and "flush()" in note
            assert opt.param_groups[0]["lr"] == 0.1 and acc.steps == 0
            if via == "flush":  # the window was the first micro-batch only: retry, then go on alike
                assert acc.flush() is True
                feed(model, acc, 4, 8)
            else:
                assert acc.flush() is True
        elif via == "backward":
            feed(model, acc, 4, 8)
        else:
            acc.flush()
            feed(model, acc, 4, 8)
        feed(model, acc, 8, 12)
        feed(model, acc, 12, 16)
        runs.append((opt.seen, [r.lr for r in acc.history]))
    assert same_grads(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_a_scheduler_that_raises_after_the_step_leaves_the_window_closed_and_recorded() -> None:
    """The optimizer has stepped: the window is recorded and the next one starts, then the
    scheduler's error is raised, saying so; no second step on a retry."""
    model = mlp()
    opt = GradCapture(model.parameters())

    class Failing:
        calls = 0

        def step(self) -> None:
            Failing.calls += 1
            if Failing.calls == 1:
                raise RuntimeError("scheduler failed (injected)")

    acc = Accumulator(model, opt, FixedSteps(2), scheduler=Failing())
    feed(model, acc, 0, 4)
    with pytest.raises(RuntimeError, match="scheduler failed") as raised:
        feed(model, acc, 4, 8)
    assert "the optimizer stepped and the window is closed and recorded" in raised.value.__notes__[0]
    assert acc.steps == 1 and len(acc.history) == 1 and acc.window_micro_batches == 0 and len(opt.seen) == 1
    assert all(p.grad is None for p in model.parameters())
    assert acc.flush() is False  # nothing pending: no second step
    feed(model, acc, 8, 12)
    assert feed(model, acc, 12, 16) is True and len(opt.seen) == 2


def test_an_lr_schedule_failing_on_a_resumed_window_leaves_the_window_unchanged() -> None:
    """A resumed window computed its schedule factor at the close, after its micro-batch was
    added: the call raised with the micro-batch in the window. It is now computed first."""
    model, _, acc = build(MODES[0])
    feed(model, acc, 0, 4)
    state = acc.state_dict()
    model2 = mlp()
    model2.load_state_dict(model.state_dict())

    def schedule(seen: int) -> float:
        raise ArithmeticError("schedule failed (injected)")

    acc2 = Accumulator(model2, torch.optim.SGD(model2.parameters(), lr=0.1), FixedSteps(2), lr_schedule=schedule)
    acc2.load_state_dict(state)
    before = window_of(acc2)
    with pytest.raises(ArithmeticError, match="schedule failed"):
        feed(model2, acc2, 4, 8)
    assert same_window(acc2, before) and acc2.window_micro_batches == 1
    assert all(p.grad is None for p in model2.parameters())


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5).double(),
                                   np.array(0.5)], ids=["np.float32", "np.float64", "tensor", "tensor64", "ndarray"])
def test_lr_schedule_may_return_numpy_scalars_and_0_dim_tensors(value) -> None:
    """They were refused as not "a finite factor"."""
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(1), lr_schedule=lambda seen: value)
    assert feed(model, acc, 0, 4) is True
    assert acc.last_record.lr == [0.1 * float(value)]


@pytest.mark.parametrize("value", [torch.tensor([0.5]), np.bool_(True), torch.tensor(float("inf")), -0.5],
                         ids=["1-dim", "bool", "inf", "negative"])
def test_lr_schedule_still_refuses_what_is_not_a_finite_real_factor(value) -> None:
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(1), lr_schedule=lambda seen: value)
    with pytest.raises(ValueError, match=r"lr_schedule\(0\) must return a finite factor >= 0 \(a real number"):
        feed(model, acc, 0, 4)
    assert acc.window_micro_batches == 0
