"""The Accumulator with statistics rules: same numbers as a loop over samples, exact steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradaccum import GSNR, FixedSteps, NormTest
from gradaccum._core.moments import Moments
from gradaccum._core.statistics import mean_gsnr
from gradaccum.torch import Accumulator

from .reference import GradCapture, ce_mean, classification, full_batch_grad, mlp, take
from .test_exactness import assert_grads_close

INC = 4


def per_sample_grads(model: nn.Module, data) -> list[torch.Tensor]:
    params = list(model.parameters())
    rows = []
    for i in range(len(data)):
        loss, _ = ce_mean(model, take(data, slice(i, i + 1)))
        rows.append(torch.autograd.grad(loss, params))
    return [torch.stack([r[j] for r in rows]) for j in range(len(params))]


def reference_gsnr(model, data, scale: str) -> float:
    stats = []
    for g in per_sample_grads(model, data):
        mean = g.mean(0)
        stats.append(Moments(len(g), mean, ((g - mean) ** 2).sum(0)))
    return mean_gsnr(stats, scale).value


@pytest.mark.parametrize("scale", ["sample", "mean"])
def test_gsnr_window_stops_where_the_reference_statistic_crosses_tau(scale: str) -> None:
    data = classification(40, seed=4)  # a problem whose first 4 samples are not all alike
    model = mlp()
    # the reference statistic (a loop over samples) after 1, 2, ..., 10 increments
    values = [reference_gsnr(model, take(data, slice(0, INC * k)), scale) for k in range(1, 11)]
    later = max(values[1:])
    # a tau the first increment does not pass but a later one does; else one nobody passes (the cap)
    tau = (values[0] + later) / 2 if later > values[0] else 2 * max(values)
    stop = next((k for k, v in enumerate(values, start=1) if v > tau), 10)
    want = full_batch_grad(model, take(data, slice(0, INC * stop)))
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, GSNR(tau, increment=INC, max_samples=40, scale=scale))
    stepped = [acc.backward(*ce_mean(model, take(data, slice(i, i + INC)))) for i in range(0, INC * stop, INC)]
    assert stepped == [False] * (stop - 1) + [True]
    record = acc.last_record
    assert record.items == INC * stop and record.info["samples"] == INC * stop
    assert record.info["gsnr"] == pytest.approx(values[stop - 1], rel=1e-9)
    assert record.info["capped"] == (stop == 10)
    assert_grads_close(opt.seen[0], want)
    if scale == "mean":
        assert 1 < stop < 10  # on the mean scale the statistic grows with n: the rule really adapts here


def test_gsnr_caps_at_max_samples_and_warns_when_not_adapting() -> None:
    data = classification(48, seed=8)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.01), GSNR(1e6, increment=INC, max_samples=8))
    acc.monitor.patience = 3
    with pytest.warns(RuntimeWarning, match="ran all of the first 3 windows to max_samples"):
        for i in range(0, 48, INC):
            acc.backward(*ce_mean(model, take(data, slice(i, i + INC))))
    assert [r.items for r in acc.history] == [8] * 6
    assert all(r.info["capped"] for r in acc.history)


def test_gsnr_first_increment_warning() -> None:
    data = classification(24, seed=8)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.01), GSNR(1e-9, increment=INC, max_samples=16))
    acc.monitor.patience = 3
    with pytest.warns(RuntimeWarning, match="after one increment"):
        for i in range(0, 24, INC):
            acc.backward(*ce_mean(model, take(data, slice(i, i + INC))))
    assert [r.items for r in acc.history] == [INC] * 6


def test_norm_test_window_matches_reference() -> None:
    data = classification(32, seed=9)
    model = mlp()
    ratios = []  # reference: the norm-test ratio after each increment, by a loop over samples
    for n in range(INC, 33, INC):
        grads = per_sample_grads(model, take(data, slice(0, n)))
        var_of_mean = sum(float(g.var(0, unbiased=True).sum()) for g in grads) / n
        ratios.append(var_of_mean / (0.5**2 * sum(float((g.mean(0) ** 2).sum()) for g in grads)))
    stop = next((k for k, r in enumerate(ratios, start=1) if r <= 1.0), 8)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.01),
                      NormTest(0.5, increment=INC, max_samples=32, source="per_sample"))
    stepped = [acc.backward(*ce_mean(model, take(data, slice(i, i + INC)))) for i in range(0, INC * stop, INC)]
    assert stepped == [False] * (stop - 1) + [True]
    assert acc.last_record.info["norm_test"] == pytest.approx(ratios[stop - 1], rel=1e-9)


def test_fixed_steps_gathers_no_statistics() -> None:
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(2))
    assert acc.stats is None
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


def test_statistics_state_round_trip_gives_the_same_decisions() -> None:
    data = classification(40, seed=10)
    rule = GSNR(0.5, increment=INC, max_samples=24, scale="mean")

    def run(split_at: int | None):
        model = mlp()
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), rule)
        for k, i in enumerate(range(0, 40, INC)):
            if k == split_at:
                state, params = acc.state_dict(), model.state_dict()
                model = mlp()
                model.load_state_dict(params)
                acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), rule)
                acc.load_state_dict(state)
            acc.backward(*ce_mean(model, take(data, slice(i, i + INC))))
        return [(r.items, r.info.get("gsnr")) for r in acc.history], [p.detach() for p in model.parameters()]

    history, params = run(None)
    assert len(history) >= 2
    history2, params2 = run(5)
    assert history2 == history
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_lr_scaling_applies_per_step_and_restores() -> None:
    data = classification(12, seed=11)
    for mode, factor in (("linear", 12 / 4), ("sqrt", math.sqrt(12 / 4))):
        model = mlp()
        want = full_batch_grad(model, data)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = Accumulator(model, opt, FixedSteps(2), lr_scaling=mode, reference_batch=4)
        acc.backward(*ce_mean(model, take(data, slice(0, 5))))
        acc.backward(*ce_mean(model, take(data, slice(5, 12))))
        assert acc.last_record.lr == [pytest.approx(0.1 * factor)]
        assert opt.param_groups[0]["lr"] == 0.1
        for p, b, g in zip(model.parameters(), before, want):
            torch.testing.assert_close(p.detach(), b - 0.1 * factor * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"lr_scaling": "cubic", "reference_batch": 4}, ValueError, "lr_scaling must be one of"),
     ({"lr_scaling": "linear"}, ValueError, "reference_batch must be given"),
     ({"lr_scaling": "linear", "reference_batch": 0}, ValueError, "reference_batch must be a positive int")],
)
def test_bad_adaptive_arguments(kwargs, error, match) -> None:
    model = mlp()
    rule = kwargs.pop("rule", FixedSteps(2))
    with pytest.raises(error, match=match):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule, **kwargs)


class TwoHeads(nn.Module):
    """A trunk and two heads; ``head`` picks the one a batch goes through (the other gets no
    gradient in that window)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk = nn.Linear(6, 8).double()
        self.heads = nn.ModuleList([nn.Linear(8, 3).double(), nn.Linear(8, 3).double()])
        self.head = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.head](torch.tanh(self.trunk(x)))


def test_a_per_element_window_is_held_by_the_statistics_and_equals_the_full_batch() -> None:
    """With a GSNR rule on one process the window's sum is the statistics' mean times the samples
    (no buffer of its own): each step equals the full-batch gradient, a parameter no micro-batch
    of the window reached gets no gradient (None, as in one big batch), and a state saved
    mid-window resumes bitwise."""
    from gradaccum.torch._window_sums import MomentWindowSums

    data = classification(24, seed=4)
    sizes = [5, 3, 4, 6, 2, 4]  # two windows of three uneven micro-batches (the rule's cap: 12)

    def rule() -> GSNR:
        return GSNR(1e9, increment=1, max_samples=12)

    def run(save_at: int | None = None) -> tuple[TwoHeads, GradCapture, Accumulator]:
        model = TwoHeads()
        opt = GradCapture(model.parameters())
        acc = Accumulator(model, opt, rule())
        assert isinstance(acc._window, MomentWindowSums)
        start = 0
        for j, n in enumerate(sizes):
            if j == save_at:  # a fresh model, optimizer and Accumulator from the saved states
                state, weights = acc.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
                model = TwoHeads()
                model.load_state_dict(weights)
                seen, opt = opt.seen, GradCapture(model.parameters())
                opt.seen = seen
                acc = Accumulator(model, opt, rule())
                acc.load_state_dict(state)
            model.head = 0 if j < 3 else 1
            acc.backward(*ce_mean(model, take(data, slice(start, start + n))))
            start += n
        acc.flush()
        return model, opt, acc

    model, opt, acc = run()
    assert [r.micro_batches for r in acc.history] == [3, 3]
    reference = TwoHeads()
    for w in range(2):
        reference.head = w
        loss, _ = ce_mean(reference, take(data, slice(12 * w, 12 * (w + 1))))
        want = torch.autograd.grad(loss, list(reference.parameters()), allow_unused=True)
        for got, expected in zip(opt.seen[w], want):
            if expected is None:
                assert got is None  # the head this window never used: no gradient at its step
            else:
                torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            for p, g in zip(reference.parameters(), want):
                if g is not None:
                    p -= 0.1 * g
    assert sum(g is None for g in opt.seen[0]) == 2  # heads.1's weight and bias
    resumed = run(save_at=4)[0]  # saved with one micro-batch of the second window in it
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
