"""Each formula of the core exists once and runs on Python numbers and arrays alike: the noise
terms' moving average (``NoiseScaleEMA.update``, which the planners on step records, the planners
in a traced step and ``MonitorLog`` all run), "a / b, or inf without signal" (``ratio_or_inf``),
and the planners' and the norm test's arithmetic, checked on windows that differ against sums
written out by hand, and host (Python floats) against arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradaccum import BatchRamp, GSNRPlanner, MonitorLog, NoiseScaleEMA, NoiseScalePlanner, NormTest, StepRecord
from gradaccum._core.arrays import ratio_or_inf
from gradaccum._core.noise_scale import averaged_noise_scale, noise_scale, window_terms
from gradaccum._core.planners import PlanSummary, after_window, summarize

DECAY = 0.7
TRACES = [4.0, 1.0, 9.0, 2.5, 6.0]  # every window differs: a weight given to the wrong one shows
SQUARED = [1.0, 3.0, 0.5, 2.0, 0.25]
GSNRS = [0.30, 0.05, 0.60, 0.10, 0.45]
SAMPLES = [8, 16, 8, 32, 16]


def hand_ema(values: list[float], decay: float) -> float:
    """``sum_k (1 - decay) decay^(K-1-k) v_k / (1 - decay^K)``, the newest window weighing most."""
    size = len(values)
    return math.fsum((1 - decay) * decay ** (size - 1 - k) * v for k, v in enumerate(values)) / (1 - decay**size)


def records() -> list[StepRecord]:
    return [StepRecord(step=k, items=n, micro_batches=1, skipped=False, reason="rule", samples=n,
                       info={"trace": t, "squared_norm": g, "gsnr": r, "samples": n})
            for k, (t, g, r, n) in enumerate(zip(TRACES, SQUARED, GSNRS, SAMPLES))]


def test_the_traced_summary_averages_differing_windows_as_written_by_hand() -> None:
    """``after_window`` (the array code a JAX step traces), run on NumPy float64 arrays, weighs the
    newest window ``1 - decay``; it equals ``summarize`` on the same records, bit for bit."""
    summary = PlanSummary(*(np.zeros((), np.float64) for _ in range(6)))
    for k, (t, g, r, n) in enumerate(zip(TRACES, SQUARED, GSNRS, SAMPLES), 1):
        summary = after_window(summary, DECAY, np.float64(n), np.bool_(True), np.float64(t), np.float64(g),
                               np.float64(r - 1 / n))
        host = summarize(records()[:k], DECAY)
        assert float(summary.trace / summary.weight) == pytest.approx(hand_ema(TRACES[:k], DECAY), rel=1e-12)
        assert float(summary.squared / summary.weight) == pytest.approx(hand_ema(SQUARED[:k], DECAY), rel=1e-12)
        assert [float(x) for x in summary[2:]] == list(host[2:]), k
    swapped = hand_ema(TRACES, 1 - DECAY)  # the control: the weights of old and new swapped
    assert float(summary.trace / summary.weight) != pytest.approx(swapped, rel=1e-3)


def test_a_window_that_does_not_count_leaves_the_traced_averages_as_they_were() -> None:
    summary = after_window(PlanSummary(*(np.zeros(()) for _ in range(6))), DECAY, np.float64(8), np.bool_(True),
                           np.float64(2.0), np.float64(1.0))
    skipped = after_window(summary, DECAY, np.float64(8), np.bool_(False), np.float64(50.0), np.float64(-3.0))
    assert [float(x) for x in skipped[2:]] == [float(x) for x in summary[2:]]
    assert float(skipped.items) == 16 and float(skipped.steps) == 2


def test_the_monitor_log_averages_differing_rows_as_written_by_hand() -> None:
    log = MonitorLog(decay=DECAY)
    for k, (t, g) in enumerate(zip(TRACES, SQUARED), 1):
        row = log.record(8, t, g)
        assert row["noise_scale_ema"] == pytest.approx(hand_ema(TRACES[:k], DECAY) / hand_ema(SQUARED[:k], DECAY),
                                                       rel=1e-12)
        assert row["noise_scale_ema"] == NoiseScaleEMA(DECAY).estimate(list(zip(TRACES[:k], SQUARED[:k])))


@pytest.mark.parametrize("k", range(0, 6))
def test_the_planners_read_the_one_moving_average(k: int) -> None:
    """``NoiseScalePlanner.noise_scale`` is ``NoiseScaleEMA.estimate`` of the same windows (NaN
    before any); ``GSNRPlanner`` plans from the same average of the debiased GSNR."""
    planner = NoiseScalePlanner(2.0, min_batch=4, max_batch=4096, micro_batch=4, decay=DECAY)
    want = NoiseScaleEMA(DECAY).estimate(list(zip(TRACES[:k], SQUARED[:k])))
    got = planner.noise_scale(records()[:k])
    assert (math.isnan(got) and math.isnan(want)) if k == 0 else got == want
    gsnr = GSNRPlanner(50.0, min_batch=1, max_batch=1 << 20, micro_batch=1, decay=DECAY)
    if k:
        signal = hand_ema([r - 1 / n for r, n in zip(GSNRS[:k], SAMPLES[:k])], DECAY)
        assert gsnr.plan(records()[:k]) == round(49.0 / signal)
    else:
        assert gsnr.plan([]) == 1  # nothing measured: min_batch


EDGES = [(3.0, 2.0), (1.0, 0.0), (1.0, -0.5), (0.0, 0.0), (math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0),
         (2.0, math.inf), (-4.0, 2.0), (5, 2)]


@pytest.mark.parametrize(("a", "b"), EDGES)
def test_ratio_or_inf_is_one_formula_for_numbers_and_arrays(a: float, b: float) -> None:
    """``a / b`` where ``b > 0``, NaN where either is NaN (nothing measured), else inf, never a
    division by ``b <= 0`` (NumPy would warn, and warnings are errors here); Python numbers give a
    Python float."""
    want = math.nan if math.isnan(a) or math.isnan(b) else a / b if b > 0 else math.inf
    host = ratio_or_inf(a, b)
    assert type(host) is float and (host == want or (math.isnan(host) and math.isnan(want)))
    for dtype in (np.float64, np.float32):
        got = ratio_or_inf(np.asarray([a], dtype), np.asarray([b], dtype))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, np.asarray([want], dtype))
    assert noise_scale(a, b) == host or math.isnan(host)


def test_averaged_noise_scale_on_numbers_and_arrays() -> None:
    cases = [(2.0, 1.0, 0.5), (2.0, -1.0, 0.5), (0.0, 0.0, 0.0), (3.0, 0.0, 0.3)]
    for trace, squared, weight in cases:
        want = math.nan if weight == 0 else (trace / weight) / (squared / weight) if squared > 0 else math.inf
        got = averaged_noise_scale(trace, squared, weight)
        arrays = averaged_noise_scale(*(np.asarray([x]) for x in (trace, squared, weight)))
        assert type(got) is float
        np.testing.assert_array_equal(np.asarray([got]), np.asarray([want]))
        np.testing.assert_array_equal(arrays, np.asarray([want]))


PROGRESS = [0, 1, 37, 99, 100, 101, 250, 10_000]


@pytest.mark.parametrize("stages", [None, 3])
def test_the_ramp_plans_alike_from_numbers_and_arrays(stages: int | None) -> None:
    ramp = BatchRamp(start=8, end=200, over=250, micro_batch=8, stages=stages)
    for progress in PROGRESS:
        fraction = min(1.0, progress / 250)
        if stages:
            fraction = math.floor(fraction * stages) / stages
        want = 8 + 192 * fraction
        assert ramp.batch_at(progress) == want and type(ramp.batch_at(progress)) is float
        assert float(ramp.batch_at(np.asarray(progress))) == want
        summary = PlanSummary(progress, 1, 0.0, 0.0, 0.0)
        plan = ramp.plan_from(summary)
        assert type(plan) is int and plan == min(max(round(want / 8), 1), 25)
        assert int(ramp.plan_from(PlanSummary(*(np.asarray(x) for x in summary)))) == plan


@pytest.mark.parametrize(("trace", "squared", "weight"), [(0.0, 0.0, 0.0), (30.0, 2.0, 0.5), (30.0, -2.0, 0.5),
                                                          (1e-9, 1.0, 0.9), (1e9, 1e-3, 0.99)])
def test_the_noise_planners_plan_alike_from_numbers_and_arrays(trace: float, squared: float, weight: float) -> None:
    """The host plan (Python floats) is the array plan: NaN (nothing measured) gives min_batch,
    no signal max_batch, else ``c B`` clamped and rounded to whole micro-batches."""
    planner = NoiseScalePlanner(2.0, min_batch=8, max_batch=512, micro_batch=4)
    host = planner.plan_from(PlanSummary(0, 0, trace, squared, weight))
    arrays = planner.plan_from(PlanSummary(*(np.asarray(x, np.float64) for x in (0, 0, trace, squared, weight))))
    if weight == 0:
        want = 2
    elif squared <= 0:
        want = 128
    else:
        want = min(max(round(min(2.0 * trace / squared, 512) / 4), 2), 128)
    assert type(host) is int and host == want and int(arrays) == want and arrays.dtype == np.int32


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize(("n", "trace", "squared"), [(1, 4.0, 1.0), (2, 4.0, 1.0), (8, 4.0, 0.1), (8, 4.0, -0.2),
                                                     (64, 0.5, 3.0), (8, 0.0, 0.0)])
def test_the_norm_test_decides_alike_on_numbers_and_arrays(n: int, trace: float, squared: float,
                                                          unbiased: bool) -> None:
    """``decision_from_terms`` on Python floats gives Python numbers equal to the decision on
    float64 arrays and to the test written out by hand."""
    rule = NormTest(0.5, unbiased=unbiased, increment=1, max_samples=64)
    variance = trace / n
    bound = 0.25 * (squared if unbiased else squared + variance)
    ratio = (variance / bound if bound > 0 else math.inf) if n >= 2 else math.nan
    noise = (trace / squared if squared > 0 else math.inf) if n >= 2 else math.nan
    stop, info = rule.decision_from_terms(n, trace, squared)
    assert type(stop) is bool and stop == (n >= 64 or (n >= 2 and ratio <= 1.0))
    assert type(info["norm_test"]) is float and type(info["noise_scale"]) is float
    np.testing.assert_array_equal([info["norm_test"], info["noise_scale"]], [ratio, noise])
    stop_a, info_a = rule.decision_from_terms(n, np.asarray(trace), np.asarray(squared))
    assert bool(stop_a) == stop
    np.testing.assert_array_equal([float(info_a["norm_test"]), float(info_a["noise_scale"])], [ratio, noise])


@pytest.mark.parametrize(("n", "t2", "s1"), [(1, 4.0, 4.0), (2, 5.0, 8.0), (5, 10.0, 49.0), (4, 3.0, 12.0000001)])
def test_window_terms_alike_on_numbers_and_arrays(n: int, t2: float, s1: float) -> None:
    """``tr(Sigma) = max(T2 - |S1|^2 / n, 0) / (n - 1)`` and ``|G|^2 = (|S1|^2 / n - tr) / n``."""
    per_sample = s1 / n
    trace = max(t2 - per_sample, 0.0) / max(n - 1, 1)
    want = (trace, (per_sample - trace) / n)
    host = window_terms(n, t2, s1)
    assert all(type(x) is float for x in host) and tuple(host) == want
    arrays = window_terms(n, np.asarray(t2), np.asarray(s1))
    assert (float(arrays.trace), float(arrays.squared_norm)) == want
