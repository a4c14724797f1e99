"""What carries across windows and across a resume, and which count a window averages over.

- the planners average the windows' noise terms with a bias-corrected exponential moving
  average whose newest window weighs ``1 - decay``: checked on windows that differ, against
  the average written out by hand;
- a resumed run goes on with its ``lr_schedule`` where it stopped (the items seen before the
  checkpoint count) and drops a ``skip_window`` window that saw a NaN before the checkpoint;
- a per-element rule's window applies the mean over its items (tokens), not over its samples
  (sequences), with a learning rate > 0, against a float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradaccum import GSNR, FixedSteps, GSNRPlanner, NoiseScalePlanner, StepRecord
from gradaccum.torch import Accumulator

from .reference import IGNORE, ce_mean, classification, mlp, take, tokens

DECAY = 0.7
# windows that differ in every term, so that a weight given to the wrong window shows
TRACES = [4.0, 1.0, 9.0, 2.5, 6.0]
SQUARED = [1.0, 3.0, 0.5, 2.0, 0.25]
GSNRS = [0.30, 0.05, 0.60, 0.10, 0.45]
SAMPLES = [8, 16, 8, 32, 16]


def history() -> list[StepRecord]:
    return [StepRecord(step=k, items=n, micro_batches=n // 4, skipped=False, reason="rule", samples=n,
                       info={"trace": t, "squared_norm": g, "gsnr": r, "samples": n})
            for k, (t, g, r, n) in enumerate(zip(TRACES, SQUARED, GSNRS, SAMPLES))]


def bias_corrected_ema(values: list[float], decay: float) -> float:
    """``sum_k (1 - decay) decay^(K-1-k) v_k / (1 - decay^K)``: the newest window weighs most."""
    size = len(values)
    weights = [(1 - decay) * decay ** (size - 1 - k) for k in range(size)]
    return math.fsum(w * v for w, v in zip(weights, values)) / (1 - decay**size)


def test_noise_scale_planner_averages_differing_windows_as_a_bias_corrected_ema() -> None:
    planner = NoiseScalePlanner(2.0, min_batch=4, max_batch=4096, micro_batch=4, decay=DECAY)
    records = history()
    for k in range(1, len(records) + 1):
        want = bias_corrected_ema(TRACES[:k], DECAY) / bias_corrected_ema(SQUARED[:k], DECAY)
        assert planner.noise_scale(records[:k]) == pytest.approx(want, rel=1e-12), k
    # the control: the same windows with the weights of old and new swapped give another value
    swapped = bias_corrected_ema(TRACES, 1 - DECAY) / bias_corrected_ema(SQUARED, 1 - DECAY)
    assert planner.noise_scale(records) != pytest.approx(swapped, rel=1e-3)


def test_gsnr_planner_averages_the_debiased_gsnr_of_differing_windows() -> None:
    """``GSNRPlanner`` plans ``(tau - 1) / r`` from the average of ``gsnr - 1/samples``."""
    tau = 400.0
    planner = GSNRPlanner(tau, min_batch=1, max_batch=1 << 20, micro_batch=1, decay=DECAY)
    records = history()
    for k in range(1, len(records) + 1):
        signal = bias_corrected_ema([r - 1 / n for r, n in zip(GSNRS[:k], SAMPLES[:k])], DECAY)
        assert planner.plan(records[:k]) == round((tau - 1) / signal), k


# ------------------------------------------------------------------ resume
DATA = classification(40)


def feed(model: nn.Module, acc: Accumulator, start: int, stop: int, nan: bool = False) -> bool:
    loss, count = ce_mean(model, take(DATA, slice(start, stop)))
    return acc.backward(loss * math.nan if nan else loss, count)


def resumed(model: nn.Module, acc: Accumulator, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer, Accumulator]:
    """A fresh process's model, SGD and Accumulator, loaded from ``model`` and ``acc``."""
    model2 = mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    acc2 = Accumulator(model2, opt2, **kwargs)
    acc2.load_state_dict(acc.state_dict())
    return model2, opt2, acc2


def seen_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate the optimizer holds at each of its steps, from now on."""
    lrs: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


def schedule(seen: int) -> float:
    return 1.0 / (1.0 + seen / 8)


def test_a_resumed_run_goes_on_with_its_lr_schedule_where_it_stopped() -> None:
    """Two windows of 8 items, then a checkpoint mid-window: the third window's step applies
    ``schedule(16)``, as in the run that was never interrupted, not ``schedule(0)``."""
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(2), lr_schedule=schedule)
    straight = seen_lrs(acc.optimizer)
    for start in range(0, 20, 4):
        feed(model, acc, start, start + 4)
    model2, opt2, acc2 = resumed(model, acc, rule=FixedSteps(2), lr_schedule=schedule)
    lrs = seen_lrs(opt2)
    assert feed(model2, acc2, 20, 24) is True
    assert feed(model, acc, 20, 24) is True
    assert straight == pytest.approx([0.1 * schedule(0), 0.1 * schedule(8), 0.1 * schedule(16)], rel=1e-15)
    assert lrs == [straight[-1]]
    assert acc2.history[-1].lr == acc.history[-1].lr
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert opt2.param_groups[0]["lr"] == 0.1  # the factor applies for the step only


@pytest.mark.parametrize("rule", [FixedSteps(3), GSNR(1e9, increment=4, max_samples=8)],
                         ids=["sums_in_grad", "statistics"])
def test_a_resumed_skip_window_window_that_saw_a_nan_is_dropped(rule) -> None:
    """A checkpoint taken after a NaN micro-batch (its loss refused before the backward, so the
    window's sums stay finite): the resumed window is dropped when it closes (no step,
    recorded as skipped), as in the run that was never interrupted."""
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule, nonfinite="skip_window")
    feed(model, acc, 0, 4)
    feed(model, acc, 4, 8, nan=True)
    before = [p.detach().clone() for p in model.parameters()]
    model2, opt2, acc2 = resumed(model, acc, rule=rule, nonfinite="skip_window")
    steps = seen_lrs(opt2)
    assert feed(model2, acc2, 8, 12) is False  # the window closed, without a step
    assert feed(model, acc, 8, 12) is False
    for run, net in ((acc, model), (acc2, model2)):
        record = run.history[-1]
        assert run.steps == 1 and record.skipped and record.reason == "nonfinite" and record.micro_batches == 3
        assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert steps == []
    assert [feed(model2, acc2, start, start + 4) for start in range(12, 24, 4)].count(True) == 1
    assert steps == [0.1]  # the next window is applied
    assert not all(torch.equal(p, b) for p, b in zip(model2.parameters(), before))


# ------------------------------------------------------------------ items, not samples
class TokenModel(nn.Module):
    """Embedding -> Linear per token: per-token logits whose per-sample statistics are exact."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, toks: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(toks)))


def test_a_per_element_rule_applies_the_mean_over_items_not_samples() -> None:
    """Sequences of 7 tokens, some ignored: each window of 8 sequences (two micro-batches of 4,
    GSNR's cap) averages over its counted tokens. With lr 0.5 the weights after three windows
    equal float64 SGD on the mean over each window's tokens; a mean over sequences is 3-7x
    larger."""
    data = tokens(24)
    model, reference = TokenModel(), TokenModel()
    lr = 0.5
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=lr), GSNR(1e9, increment=4, max_samples=8))
    assert acc.stats is not None and acc.stats.statistics == "elements"
    for window in range(3):
        part = take(data, slice(8 * window, 8 * window + 8))
        items = int((part.labels != IGNORE).sum())
        assert items != len(part)
        for start in (0, 4):
            micro = take(part, slice(start, start + 4))
            loss, count = ce_mean(model, micro)
            stepped = acc.backward(loss, count)
        assert stepped and acc.history[-1].items == items and acc.history[-1].samples == 8
        loss, _ = ce_mean(reference, part)  # the mean over the window's counted tokens, in one call
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= lr * g
        for got, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
