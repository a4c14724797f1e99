"""Per-element statistics from the micro-batches' means (docs/design.md, "Micro-batch statistics"),
the core's array code on NumPy in float64, against loops over the micro-batches.

``M2 = sum_j b_j (g_j - g)^2`` per element has expectation ``(k - 1) sigma^2``; the rules read
it as ``Moments`` whose ``m2 / (n - 1)`` is ``M2 / (k - 1)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradaccum import GSNR, GSNRPlanner, NoiseScalePlanner, NormTest
from gradaccum._core.micro_batch import (
    EMPTY,
    element_moments,
    m2_from_squares,
    merge_micro_batch,
    micro_batch_terms,
)
from gradaccum._core.noise_scale import noise_terms, pooled_terms
from gradaccum._core.rules import statistics_source
from gradaccum._core.statistics import gsnr_of

from .test_micro_batch import per_sample_gradients, regression

SIZES = (3, 1, 5, 2)



def _groups(seed: int = 1, sizes: tuple[int, ...] = SIZES, shape: tuple[int, ...] = (4, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(b, *shape)) + 0.3 for b in sizes]


def _loop_m2(groups: list[np.ndarray]) -> np.ndarray:
    """``sum_j b_j (g_j - g)^2`` per element, by definition."""
    n = sum(len(g) for g in groups)
    mean = sum(g.sum(0) for g in groups) / n
    return sum(len(g) * (g.mean(0) - mean) ** 2 for g in groups)


def _chan(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """The window as a backend keeps it: the sum and Chan's ``M2``, one micro-batch at a time."""
    total, m2, n = np.zeros(groups[0].shape[1:]), np.zeros(groups[0].shape[1:]), 0
    for g in groups:
        m2 = merge_micro_batch(m2, total, n, g.sum(0), len(g))
        total, n = total + g.sum(0), n + len(g)
    return total, m2, n


def test_chan_and_squares_forms_equal_the_loop_over_uneven_micro_batches() -> None:
    groups = _groups()
    total, m2, n = _chan(groups)
    assert n == sum(SIZES)
    np.testing.assert_allclose(m2, _loop_m2(groups), rtol=1e-12)
    squares = sum(g.sum(0) ** 2 / len(g) for g in groups)
    np.testing.assert_allclose(m2_from_squares(squares, total, n), _loop_m2(groups), rtol=1e-10)


def test_counts_may_be_integer_arrays() -> None:
    groups = _groups()
    total, m2, n = np.zeros((4, 3)), np.zeros((4, 3)), np.asarray(0, np.int32)
    for g in groups:
        m2 = merge_micro_batch(m2, total, n, g.sum(0), np.asarray(len(g), np.int32))
        total, n = total + g.sum(0), n + len(g)
    np.testing.assert_allclose(m2, _loop_m2(groups), rtol=1e-12)


def test_a_micro_batch_without_samples_adds_nothing() -> None:
    groups = _groups()
    total, m2, n = _chan(groups)
    assert np.array_equal(merge_micro_batch(m2, total, n, np.zeros_like(total), 0), m2)


def test_the_rules_read_the_variance_of_the_micro_batch_means() -> None:
    """The GSNR, its mean scale and the noise terms from ``element_moments`` equal the
    definitions computed by hand from the micro-batch means."""
    groups = _groups()
    total, m2, n = _chan(groups)
    k = len(groups)
    moments = element_moments(k, n, total, m2)
    variance = _loop_m2(groups) / (k - 1)  # per sample, per element
    mean = total / n
    assert moments.n == n
    np.testing.assert_allclose(moments.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(moments.m2 / (n - 1), variance, rtol=1e-12)
    value, live, skipped = gsnr_of([moments.mean], [moments.m2], n, "sample")
    assert live == mean.size and skipped == 0
    assert float(value) == pytest.approx(np.mean(mean**2 / variance), rel=1e-12)
    value, _, _ = gsnr_of([moments.mean], [moments.m2], n, "mean")
    assert float(value) == pytest.approx(np.mean(mean**2 / (variance / n)), rel=1e-12)  # |mu|^2 / var of the mean
    trace, squared = noise_terms(n, [moments.mean], [moments.m2])
    assert float(trace) == pytest.approx(variance.sum(), rel=1e-12)
    assert float(squared) == pytest.approx(np.sum(mean**2) - variance.sum() / n, rel=1e-12)


def test_the_norm_terms_are_the_elements_summed() -> None:
    """``micro_batch_terms`` (array and host forms) equals ``pooled_terms`` of the micro-batch
    sums, and the per-element variances summed."""
    groups = _groups()
    sums = EMPTY
    for g in groups:
        s = g.sum(0)
        sums = sums.add(float(np.sum(s * s)), len(g))
    total = sum(g.sum(0) for g in groups)
    want = pooled_terms(sums.norm_sums(float(np.sum(total * total))))
    host = micro_batch_terms(sums.micro_batches, sums.samples, sums.weighted, float(np.sum(total * total)))
    array = micro_batch_terms(np.asarray(sums.micro_batches), np.asarray(sums.samples), np.asarray(sums.weighted),
                              np.asarray(np.sum(total * total)))
    for got in (host, array):
        assert float(got.trace) == pytest.approx(want.trace, rel=1e-12)
        assert float(got.squared_norm) == pytest.approx(want.squared_norm, rel=1e-12)
    assert want.trace == pytest.approx(_loop_m2(groups).sum() / (len(groups) - 1), rel=1e-12)


def test_one_micro_batch_has_no_variance() -> None:
    (g,) = _groups(sizes=(4,))
    total, m2, n = _chan([g])
    moments = element_moments(1, n, total, m2)
    assert np.all(np.isnan(moments.m2))
    assert math.isnan(float(gsnr_of([moments.mean], [moments.m2], n, "sample")[0]))
    stop, info = GSNR(0.01, increment=4, max_samples=64).decision(n, [moments.mean], [moments.m2])
    assert not bool(stop) and math.isnan(float(info["gsnr"]))
    s = float(np.sum(g.sum(0) ** 2))
    for terms in (micro_batch_terms(1, 4, s / 4, s), micro_batch_terms(np.asarray(1), np.asarray(4),
                                                                       np.asarray(s / 4), np.asarray(s))):
        assert math.isnan(float(terms.trace)) and math.isnan(float(terms.squared_norm))


@pytest.mark.parametrize("anisotropic", [False, True], ids=["isotropic", "anisotropic"])
@pytest.mark.parametrize("k", [2, 4, 8, 32])
def test_unbiased_per_element_on_linear_regression(k: int, anisotropic: bool) -> None:
    """Over 400 windows of ``k`` uneven micro-batches, the averaged per-sample variance of every
    element is within 3 standard errors of the closed form
    ``var_e = s_e^2 (delta' L delta + sigma^2) + (s_e^2 delta_e)^2`` (``L = diag(s^2)``)."""
    rng, delta, scales, sigma, trace, _ = regression(6, anisotropic, seed=100 + k)
    cov = scales**2
    want = cov * (delta @ (cov * delta) + sigma**2) + (cov * delta) ** 2
    assert want.sum() == pytest.approx(trace, rel=1e-12)
    estimates = []
    for _ in range(400):
        groups = [per_sample_gradients(rng, delta, scales, sigma, 1 + j % 3) for j in range(k)]
        total, m2, n = _chan(groups)
        moments = element_moments(k, n, total, m2)
        estimates.append(moments.m2 / (n - 1))
    estimates = np.asarray(estimates)
    mean, error = estimates.mean(0), estimates.std(0, ddof=1) / math.sqrt(len(estimates))
    assert np.all(np.abs(mean - want) <= 3 * error), (mean, want, error)


def test_each_backend_decides_whether_it_takes_per_element_statistics_from_micro_batches() -> None:
    """The core refuses a per-element rule on the micro-batch source unless the backend says
    it takes them, naming the backend; norm rules are taken everywhere."""
    for rule in (GSNR(2.0, scale="mean", source="micro_batch"),
                 GSNRPlanner(tau=2.0, min_batch=4, max_batch=16, micro_batch=2, source="micro_batch")):
        with pytest.raises(ValueError, match="source='micro_batch'.*the torch backend.*source='per_sample'"):
            statistics_source(rule, backend="the torch backend")
        assert statistics_source(rule, elements=True) == "micro_batch"
    assert statistics_source(NormTest(0.5, source="micro_batch")) == "micro_batch"
    assert statistics_source(GSNR(0.1)) == "per_sample"
    with pytest.raises(ValueError, match="source"):
        GSNR(0.1, source="hooks")
    with pytest.raises(ValueError, match="2 \\* micro_batch"):
        GSNRPlanner(tau=2.0, min_batch=4, max_batch=4, micro_batch=4, source="micro_batch")
    assert NoiseScalePlanner(c=1.0, min_batch=2, max_batch=8, micro_batch=2, source="micro_batch").plan([]) == 2
