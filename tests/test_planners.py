"""Planners and the gradient noise scale.

Planners are pure functions of the step records: property tests for bounds, monotone
ramps and exact windows; a planned window equals a FixedSteps window of the same length
bitwise; the noise-scale estimator is checked on linear regression with Gaussian noise,
where tr(Sigma) and |G|^2 have closed forms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradaccum import BatchRamp, FixedSteps, GSNRPlanner, NoiseScaleEMA, NoiseScalePlanner, NormTestPlanner, StepRecord
from gradaccum._core.noise_scale import noise_terms
from gradaccum.torch import Accumulator

from .reference import GradCapture, ce_mean, classification, mlp, take


def records(sizes: list[int], info: dict | None = None) -> list[StepRecord]:
    return [StepRecord(step=k, items=s, micro_batches=1, skipped=False, reason="rule", info=dict(info or {}))
            for k, s in enumerate(sizes)]


@given(start=st.integers(1, 64), extra=st.integers(0, 512), over=st.integers(1, 5000), micro=st.integers(1, 64),
       stages=st.one_of(st.none(), st.integers(1, 8)), steps=st.lists(st.integers(1, 600), max_size=40))
def test_ramp_is_bounded_and_monotone(start, extra, over, micro, stages, steps) -> None:
    if micro > start:
        with pytest.raises(ValueError, match="micro_batch .* must be <= start"):
            BatchRamp(start, start + extra, over, micro, stages=stages)
        return
    ramp = BatchRamp(start, start + extra, over, micro, stages=stages)
    plans = [ramp.plan(records(steps[:k])) for k in range(len(steps) + 1)]
    low, high = -(-start // micro), max(1, (start + extra) // micro)
    assert all(min(low, high) <= p <= max(low, high) for p in plans)
    assert plans == sorted(plans)  # samples only grow, and so does the window
    assert ramp.plan(records([over])) == high  # at the end of the ramp: the end size


def test_ramp_in_steps_and_stages() -> None:
    ramp = BatchRamp(32, 256, over=4, micro_batch=32, unit="steps", stages=2)
    assert [ramp.plan(records([1] * k)) for k in range(6)] == [1, 1, 4, 4, 8, 8]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(start=64, end=32, over=10, micro_batch=32), "start .* must be <= end"),
    (dict(start=32, end=64, over=10, micro_batch=64), "micro_batch .* must be <= start"),
    (dict(start=32, end=64, over=1000, micro_batch=32, budget=500), "longer than the budget"),
    (dict(start=32, end=64, over=0, micro_batch=32), "over must be a positive int"),
    (dict(start=32, end=64, over=10, micro_batch=32, unit="tokens"), "unit must be one of"),
])
def test_bad_ramps_name_the_setting(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        BatchRamp(**kwargs)


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (NoiseScalePlanner, dict(c=0.0, min_batch=32, max_batch=512, micro_batch=32), "c must be a positive"),
    (NoiseScalePlanner, dict(c=-1.0, min_batch=32, max_batch=512, micro_batch=32), "c must be a positive"),
    (NoiseScalePlanner, dict(c=1.0, min_batch=512, max_batch=32, micro_batch=32), "min_batch .* must be <= max_batch"),
    (NoiseScalePlanner, dict(c=1.0, min_batch=32, max_batch=512, micro_batch=32, decay=1.0), "decay must be in"),
    (NormTestPlanner, dict(theta=1.5, min_batch=32, max_batch=512, micro_batch=32), "theta .* must be < 1"),
])
def test_bad_noise_planners_name_the_setting(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@given(trace=st.floats(0.01, 1e4), squared=st.floats(-1.0, 10.0), c=st.floats(0.1, 4.0), every=st.integers(1, 4),
       windows=st.integers(0, 12))
def test_noise_planner_is_bounded_and_pure(trace, squared, c, every, windows) -> None:
    planner = NoiseScalePlanner(c=c, min_batch=64, max_batch=1024, micro_batch=32, every=every)
    history = records([256] * windows, {"trace": trace, "squared_norm": squared})
    k = planner.plan(history)
    assert 2 <= k <= 32 and planner.plan(history) == k
    if windows < every:
        assert k == 2  # nothing measured yet: min_batch
    elif squared <= 0:
        assert k == 32  # no signal: the cap
    else:
        assert k == min(max(round(c * trace / squared / 32), 2), 32)
    # changed at most every `every` steps: windows after the last multiple of it are not read yet
    block = history[: len(history) - len(history) % every]
    other = records([256] * (every - 1), {"trace": 1.0, "squared_norm": 1e9})
    assert all(planner.plan(block + other[:j]) == planner.plan(block) for j in range(every))


def test_norm_test_planner_uses_the_biased_or_unbiased_threshold() -> None:
    history = records([256] * 3, {"trace": 400.0, "squared_norm": 1.0})  # B_simple = 400
    # biased: n = 400 (1 - 0.25) / 0.25 = 1200 samples = 37.5 micro-batches, rounded half to even
    assert NormTestPlanner(theta=0.5, min_batch=32, max_batch=4096, micro_batch=32).plan(history) == 38
    assert NormTestPlanner(theta=0.5, min_batch=32, max_batch=4096, micro_batch=32, unbiased=True).plan(history) == 50


def test_ema_handles_non_positive_squared_norms() -> None:
    ema = NoiseScaleEMA(0.5)
    assert math.isnan(ema.estimate([]))
    assert ema.estimate([(4.0, -1.0)]) == math.inf  # no measurable signal: never a division by it
    # trace EMA 3 / weight 0.75 = 4; |G|^2 EMA 1.25 / 0.75: the ratio of the averages, not of the windows
    assert ema.estimate([(4.0, -1.0), (4.0, 3.0)]) == pytest.approx(2.4, rel=1e-12)


def test_noise_terms_on_linear_regression_match_the_closed_form() -> None:
    """g_i = -(y_i - w.x_i) x_i with x ~ N(0, I_d), y = w*.x + N(0, s^2): G = w - w*,
    tr(Sigma) = (d + 1) |w - w*|^2 + d s^2. The estimate over many windows is within its
    standard error of the truth."""
    rng = np.random.default_rng(0)
    d, s, n, windows = 5, 0.7, 64, 400
    w_star, w = rng.normal(size=d), rng.normal(size=d)
    delta = w - w_star
    true_trace, true_g2 = (d + 1) * delta @ delta + d * s**2, delta @ delta
    traces, squares = [], []
    for _ in range(windows):
        x = rng.normal(size=(n, d))
        y = x @ w_star + s * rng.normal(size=n)
        g = -(y - x @ w)[:, None] * x
        mean = g.mean(0)
        terms = noise_terms(n, [mean], [((g - mean) ** 2).sum(0)])
        traces.append(float(terms.trace))
        squares.append(float(terms.squared_norm))
    for values, truth in ((traces, true_trace), (squares, true_g2)):
        err = np.std(values) / math.sqrt(windows)
        assert abs(np.mean(values) - truth) < 3 * err


@pytest.mark.parametrize("k", [1, 3])
def test_a_planned_window_equals_a_fixed_steps_window_bitwise(k: int) -> None:
    data = classification(36)
    runs = []
    for rule in (FixedSteps(k), BatchRamp(4 * k, 4 * k, over=1, micro_batch=4)):
        model = mlp()
        opt = GradCapture(model.parameters())
        acc = Accumulator(model, opt, rule)
        for start in range(0, 36, 4):
            acc.backward(*ce_mean(model, take(data, slice(start, start + 4))))
        acc.flush()
        runs.append(opt.seen)
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_ramp_through_the_accumulator_and_resume_keeps_the_plan() -> None:
    data = classification(120)
    ramp = BatchRamp(8, 32, over=64, micro_batch=4)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), ramp)
    planned = []
    for start in range(0, 120, 4):
        planned.append(acc.planned_micro_batches)
        acc.backward(*ce_mean(model, take(data, slice(start, start + 4))))
        if start == 60:
            state = acc.state_dict()
            other_model = mlp()
            other_model.load_state_dict(model.state_dict())
            other = Accumulator(other_model, torch.optim.SGD(other_model.parameters(), lr=0.05), ramp)
            other.load_state_dict(state)
            assert other.planned_micro_batches == acc.planned_micro_batches
    sizes = [r.items for r in acc.history]
    assert sizes == sorted(sizes) and sizes[0] == 8 and sizes[-1] == 32
    assert all(r.info == {"planned": r.micro_batches} for r in acc.history)


def planned_run(planner) -> Accumulator:
    """256 samples in micro-batches of 8 through an Accumulator with ``planner``; checks that
    each window is what the planner computes from the records before it."""
    data = classification(256)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), planner)
    for start in range(0, 256, 8):
        acc.backward(*ce_mean(model, take(data, slice(start, start + 8))))
    for k in range(1, len(acc.history)):
        assert acc.history[k].micro_batches == planner.plan(acc.history[:k])
    return acc


def test_noise_scale_planner_records_its_terms_and_plans_from_them() -> None:
    acc = planned_run(NoiseScalePlanner(c=1.0, min_batch=8, max_batch=64, micro_batch=8, source="per_sample"))
    first = acc.history[0]
    assert {"trace", "squared_norm", "noise_scale", "planned"} <= set(first.info)
    assert first.items == 8  # nothing measured before the first window
    assert all(8 <= r.items <= 64 for r in acc.history)


def test_keep_history_is_required_with_a_planner() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="keep_history must be True with a planner"):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchRamp(8, 32, 64, 4), keep_history=False)


def test_lr_schedule_over_items_with_a_planner() -> None:
    """With a ramp the number of steps is not known in advance: an LR schedule over items
    seen (warmup, then decay) applies per step, on top of the optimizer's lr, and resumes."""
    data = classification(160)
    schedule = lambda seen: min(1.0, (seen + 8) / 64) * 0.5 ** (seen / 128)  # noqa: E731
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchRamp(8, 32, over=96, micro_batch=8),
                      lr_schedule=schedule)
    for start in range(0, 160, 8):
        acc.backward(*ce_mean(model, take(data, slice(start, start + 8))))
    seen = 0
    for record in acc.history:
        assert record.lr[0] == pytest.approx(0.1 * schedule(seen), rel=1e-12)
        seen += record.items
    assert acc.optimizer.param_groups[0]["lr"] == 0.1  # the factor holds for its step only
    assert acc.state_dict()["items_seen"] == seen


def test_a_bad_lr_schedule_is_named() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="lr_schedule must be a callable"):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(1), lr_schedule=0.5)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(1),
                      lr_schedule=lambda seen: float("nan"))
    with pytest.raises(ValueError, match=r"lr_schedule\(0\) must return a finite factor"):
        acc.backward(*ce_mean(model, take(classification(4), slice(0, 4))))
    assert acc.window_micro_batches == 0 and all(p.grad is None for p in model.parameters())


def test_gsnr_planner_plans_where_the_mean_scale_test_is_expected_to_pass() -> None:
    """Windows that measured a per-sample GSNR g over n samples estimate r = g - 1/n; the plan
    is (tau - 1) / r samples, clamped; no signal plans the cap, nothing measured the floor."""
    planner = GSNRPlanner(tau=3.0, min_batch=8, max_batch=512, micro_batch=8)
    assert planner.plan([]) == 1
    history = records([64] * 3, {"trace": 1.0, "squared_norm": 0.1, "gsnr": 0.02 + 1 / 64, "samples": 64})
    assert planner.plan(history) == round((3.0 - 1) / 0.02 / 8)  # 100 samples: 12 micro-batches (12.5 rounds to even)
    flat = records([64] * 3, {"trace": 1.0, "squared_norm": 0.1, "gsnr": 1 / 64, "samples": 64})
    assert planner.plan(flat) == 512 // 8
    assert GSNRPlanner(tau=3.0, min_batch=8, max_batch=512, micro_batch=8).statistics == "elements"
    with pytest.raises(ValueError, match="tau .* must be > 1"):
        GSNRPlanner(tau=1.0, min_batch=8, max_batch=512, micro_batch=8)


def test_gsnr_planner_records_the_gsnr_it_plans_from() -> None:
    acc = planned_run(GSNRPlanner(tau=2.0, min_batch=8, max_batch=64, micro_batch=8))
    assert acc.stats is not None and acc.stats.statistics == "elements"
    assert {"gsnr", "samples", "trace", "squared_norm"} <= set(acc.history[0].info)


PLANNERS = [BatchRamp(16, 48, over=96, micro_batch=8),
            NoiseScalePlanner(c=1.0, min_batch=16, max_batch=64, micro_batch=8),
            GSNRPlanner(tau=2.0, min_batch=16, max_batch=64, micro_batch=8)]


def saved_planned(planner) -> tuple[dict, Accumulator]:
    """A state saved mid-window after three planned windows, and a fresh Accumulator to load it."""
    data = classification(160)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), planner)
    for start in range(0, 160, 8):
        acc.backward(*ce_mean(model, take(data, slice(start, start + 8))))
        if acc.steps >= 3 and acc.window_micro_batches:
            break
    assert acc.steps >= 3 and acc.window_micro_batches
    fresh = mlp()
    return acc.state_dict(), Accumulator(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05), planner)


def tampered(state: dict, what: str) -> dict:
    bad = dict(state, history=[dict(r, info=dict(r["info"])) for r in state["history"]])
    first = bad["history"][0]
    if what == "items 10**12":
        first["items"] = 10**12
    elif what == "items -1000":
        first["items"] = -1000
    elif what == "trace -1e6":
        first["info"]["trace"] = -1e6
    elif what == "squared_norm NaN":
        first["info"]["squared_norm"] = math.nan
    elif what == "gsnr inf":
        first["info"]["gsnr"] = math.inf
    elif what == "emptied history":
        bad["history"] = []
    elif what == "window longer than its plan":
        bad["micro_batches"] = 40
    return bad


CASES = [("items 10**12", r"state\['history'\]: its records' items add up to 1000000000\d+, not state\['items_seen'\]"),
         ("items -1000", r"state\['history'\]\[0\]\['items'\] must be an int >= 0, got -1000"),
         ("trace -1e6", r"state\['history'\]\[0\]\['info'\]\['trace'\] must be a real number >= 0"),
         ("squared_norm NaN", r"state\['history'\]\[0\]\['info'\]\['squared_norm'\] must be a finite real number"),
         ("gsnr inf", r"state\['history'\]\[0\]\['info'\]\['gsnr'\] must be a finite real number >= 0, got inf"),
         ("emptied history", r"state\['history'\] holds 0 records for state\['steps'\]=\d+ windows"),
         ("window longer than its plan", r"state\['micro_batches'\]=40: the open window is planned for \d+")]


NOISE_TERMS = ("trace -1e6", "squared_norm NaN", "gsnr inf")


def applicable(planner, what: str) -> bool:
    """A ramp's records hold no noise terms; only the GSNR planner's hold a gsnr."""
    return what not in NOISE_TERMS or (planner.needs_statistics
                                       and (what != "gsnr inf" or isinstance(planner, GSNRPlanner)))


@pytest.mark.parametrize(("planner", "what", "match"),
                         [pytest.param(p, what, match, id=f"{type(p).__name__}-{what}")
                          for p in PLANNERS for what, match in CASES if applicable(p, what)])
def test_a_resumed_planner_refuses_a_tampered_history_by_name(planner, what: str, match: str) -> None:
    """A resumed planner planned every later window from whatever history it loaded. Every
    value it reads is checked first, and against the counters; the Accumulator is unchanged
    on refusal and the untouched state still loads."""
    state, acc = saved_planned(planner)
    before = (acc.window_micro_batches, acc.window_items, acc.steps, acc.planned_micro_batches, list(acc.history))
    with pytest.raises(ValueError, match=match):
        acc.load_state_dict(tampered(state, what))
    assert before == (acc.window_micro_batches, acc.window_items, acc.steps, acc.planned_micro_batches, acc.history)
    acc.load_state_dict(state)
    assert acc.steps == state["steps"] and acc.window_micro_batches == state["micro_batches"]
