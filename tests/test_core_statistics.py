"""Core moments, GSNR and norm-test statistics against slow, obviously-correct loops."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradaccum import GSNR, NormTest, WindowView
from gradaccum._core.moments import Moments, merge, moments_from_sums, variance
from gradaccum._core.statistics import mean_gsnr, norm_test_terms


def two_pass(g: np.ndarray) -> Moments:
    """Reference moments of per-sample gradients g (samples x elements), two passes."""
    mean = g.mean(0)
    return Moments(len(g), mean, ((g - mean) ** 2).sum(0))


def slow_gsnr(per_sample: list[np.ndarray], scale: str) -> tuple[float, int]:
    ratios = []
    skipped = 0
    for g in per_sample:
        n = g.shape[0]
        flat = g.reshape(n, -1)
        for j in range(flat.shape[1]):
            col = [float(v) for v in flat[:, j]]
            mu = sum(col) / n
            var = sum((v - mu) ** 2 for v in col) / (n - 1)
            if var == 0:
                skipped += 1
                continue
            ratios.append(mu * mu / var * (n if scale == "mean" else 1))
    return sum(ratios) / len(ratios), skipped


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6), seed=st.integers(0, 10**6))
def test_chan_merge_equals_two_pass_over_all_samples(sizes: list[int], seed: int) -> None:
    g = np.random.default_rng(seed).normal(0.5, 2.0, (sum(sizes), 7))
    merged = None
    start = 0
    for n in sizes:
        part = g[start:start + n]
        start += n
        merged = merge(merged, moments_from_sums(n, part.sum(0), (part**2).sum(0)))
    want = two_pass(g)
    assert merged.n == want.n
    np.testing.assert_allclose(merged.mean, want.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.m2, want.m2, rtol=1e-9, atol=1e-9)


def test_chan_merge_survives_float32_where_sum_of_squares_cancels() -> None:
    """High GSNR (mean 1000, std 1): S2 - n mu^2 in float32 loses every digit; Chan does not."""
    g = np.random.default_rng(0).normal(1000.0, 1.0, (512, 50))
    truth = g.var(0, ddof=1)
    g32 = g.astype(np.float32)
    s1, s2 = g32.sum(0), (g32**2).sum(0)
    naive = (s2 - 512 * (s1 / 512) ** 2) / 511
    merged = None
    for i in range(0, 512, 32):
        merged = merge(merged, two_pass(g32[i:i + 32]))
    assert np.max(np.abs(naive - truth) / truth) > 0.5
    assert np.max(np.abs(variance(merged) - truth) / truth) < 1e-3


@pytest.mark.parametrize("scale", ["sample", "mean"])
def test_mean_gsnr_matches_slow_loop_for_numpy_and_torch(scale: str) -> None:
    rng = np.random.default_rng(1)
    per_sample = [rng.normal(0.2, 1.0, (24, 3, 4)), rng.normal(-0.5, 0.7, (24, 5))]
    per_sample[0][:, 1, 2] = 0.0  # a dead unit: zero mean and zero variance
    want, skipped = slow_gsnr(per_sample, scale)
    assert skipped == 1
    for to_array in (np.asarray, torch.from_numpy):
        stats = [two_pass(g) for g in per_sample]
        stats = [Moments(m.n, to_array(m.mean), to_array(m.m2)) for m in stats]
        got = mean_gsnr(stats, scale)
        assert got.value == pytest.approx(want, rel=1e-12)
        assert got.skipped == 1 and got.elements == 3 * 4 + 5 - 1


def test_norm_test_terms_match_definition() -> None:
    rng = np.random.default_rng(2)
    per_sample = [rng.normal(0.1, 1.0, (40, 6)), rng.normal(0.3, 2.0, (40, 2))]
    terms = norm_test_terms([two_pass(g) for g in per_sample])
    all_g = np.concatenate(per_sample, axis=1)
    assert terms.variance_of_mean == pytest.approx(all_g.var(0, ddof=1).sum() / 40, rel=1e-12)
    assert terms.squared_norm == pytest.approx((all_g.mean(0) ** 2).sum(), rel=1e-12)


def window(per_sample: list[np.ndarray]) -> WindowView:
    return WindowView(1, len(per_sample[0]), [two_pass(g) for g in per_sample])


def test_gsnr_rule_decisions() -> None:
    rng = np.random.default_rng(3)
    noisy = [rng.normal(0.0, 1.0, (32, 10))]
    strong = [rng.normal(3.0, 1.0, (32, 10))]
    rule = GSNR(1.0, increment=32, max_samples=128)
    assert rule.needs_statistics
    assert rule.decide(window(noisy)).stop is False
    decision = rule.decide(window(strong))
    assert decision.stop is True and decision.info["gsnr"] > 1.0 and decision.info["samples"] == 32
    capped = rule.decide(window([rng.normal(0.0, 1.0, (128, 10))]))
    assert capped.stop is True and capped.info["capped"] is True
    # the mean scale is n times the sample scale
    s = GSNR(1.0, scale="sample").decide(window(noisy)).info["gsnr"]
    m = GSNR(1.0, scale="mean").decide(window(noisy)).info["gsnr"]
    assert m == pytest.approx(32 * s, rel=1e-12)
    assert GSNR(1e-9, min_samples=64).decide(window(strong)).stop is False
    assert GSNR(1e-9).decide(window([strong[0][:1]])).stop is False  # n = 1: no variance yet


def test_norm_test_rule_decisions() -> None:
    rng = np.random.default_rng(4)
    assert NormTest(0.5).decide(window([rng.normal(3.0, 1.0, (32, 10))])).stop is True
    decision = NormTest(0.5).decide(window([rng.normal(0.0, 1.0, (32, 10))]))
    assert decision.stop is False and decision.info["norm_test"] > 1.0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [(lambda: GSNR(0.0), ValueError, "tau must be a positive finite number"),
     (lambda: GSNR(-1.0), ValueError, "tau must be a positive finite number"),
     (lambda: GSNR(math.nan), ValueError, "tau must be a positive finite number"),
     (lambda: GSNR("high"), TypeError, "tau must be a positive finite number"),
     (lambda: GSNR(0.1, increment=0), ValueError, "increment must be a positive int"),
     (lambda: GSNR(0.1, increment=1024), ValueError, r"increment \(1024\) must be <= max_samples \(512\)"),
     (lambda: GSNR(0.1, scale="batch"), ValueError, "scale must be one of 'sample', 'mean'"),
     (lambda: GSNR(0.1, min_samples=1024), ValueError, "min_samples"),
     (lambda: NormTest(0.0), ValueError, "theta must be a positive finite number"),
     (lambda: NormTest(0.5, max_samples=0), ValueError, "max_samples must be a positive int")],
)
def test_rule_arguments_are_checked(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_statistics_rules_refuse_a_window_without_statistics() -> None:
    with pytest.raises(ValueError, match="needs per-sample statistics"):
        GSNR(0.1).decide(WindowView(1, 32, None))


@pytest.mark.slow
def test_core_imports_neither_torch_nor_jax() -> None:
    code = "import sys, gradaccum; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("trace, squared_norm", [(math.nan, math.nan), (2.0, math.nan), (math.nan, 1.0)])
def test_a_window_with_nothing_measured_has_no_noise_scale_rather_than_an_infinite_one(
        trace: float, squared_norm: float) -> None:
    """NaN terms (a window of one micro-batch on the micro-batch source) mean nothing was measured:
    the noise scale is NaN, not the infinite one of a window whose gradient has no signal."""
    stop, info = NormTest(0.5).decision_from_terms(4, trace, squared_norm)
    assert not stop and math.isnan(info["noise_scale"]) and math.isnan(info["norm_test"])
    assert math.isinf(NormTest(0.5).decision_from_terms(4, 2.0, 0.0)[1]["noise_scale"])
    arrays = NormTest(0.5).decision_from_terms(np.asarray(4), np.asarray(trace), np.asarray(squared_norm))[1]
    assert np.isnan(arrays["noise_scale"])
