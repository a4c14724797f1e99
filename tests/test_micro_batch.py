"""Noise terms from the micro-batches' own gradients (docs/design.md, "Micro-batch statistics").

The estimator against a hand computation, and unbiased on linear regression, whose noise terms
have a closed form at fixed parameters: loss ``(x . w - y)^2 / 2`` with ``y = x . w* + eps``,
``delta = w - w*``; for ``x ~ N(0, L)``, ``G = L delta`` and
``tr(Sigma) = (delta' L delta + sigma^2) tr(L) + |L delta|^2`` (``L = I``: ``d (|delta|^2 +
sigma^2) + |delta|^2``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradaccum._core.micro_batch import EMPTY, MicroBatchSums
from gradaccum._core.noise_scale import pooled_terms


def regression(d: int, anisotropic: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    delta = rng.normal(size=d) * 0.5
    scales = np.linspace(0.2, 2.0, d) if anisotropic else np.ones(d)
    cov = np.diag(scales**2)
    sigma = 0.7
    trace = (delta @ cov @ delta + sigma**2) * np.trace(cov) + np.sum((cov @ delta) ** 2)
    return rng, delta, scales, sigma, float(trace), float(np.sum((cov @ delta) ** 2))


def per_sample_gradients(rng, delta, scales, sigma, b: int) -> np.ndarray:
    x = rng.normal(size=(b, len(delta))) * scales
    residual = x @ delta - sigma * rng.normal(size=b)
    return x * residual[:, None]


def test_the_terms_equal_a_hand_computation_for_uneven_micro_batches() -> None:
    rng = np.random.default_rng(1)
    groups = [rng.normal(size=(b, 3)) for b in (1, 4, 2)]
    sums = EMPTY
    for g in groups:
        s = g.sum(0)
        sums = sums.add(float(s @ s), len(g))
    total = sum(g.sum(0) for g in groups)
    n, k = 7, 3
    means = [g.mean(0) for g in groups]
    mean = total / n
    trace = sum(len(g) * np.sum((m - mean) ** 2) for g, m in zip(groups, means)) / (k - 1)
    got = pooled_terms(sums.norm_sums(float(total @ total)))
    assert got.samples == n
    assert got.trace == pytest.approx(trace, rel=1e-12)
    assert got.squared_norm == pytest.approx(mean @ mean - trace / n, rel=1e-12)


def test_one_micro_batch_has_no_variance() -> None:
    sums = EMPTY.add(4.0, 3)
    terms = pooled_terms(sums.norm_sums(4.0))
    assert math.isnan(terms.trace) and math.isnan(terms.squared_norm)


@pytest.mark.parametrize("bad", [(math.nan, 2), (-1.0, 2), (math.inf, 2), (1.0, 0)])
def test_add_refuses_what_no_micro_batch_measures(bad) -> None:
    with pytest.raises(ValueError):
        EMPTY.add(*bad)


def test_sums_add_over_processes() -> None:
    a, b = MicroBatchSums(2, 5, 3.0), MicroBatchSums(3, 4, 1.5)
    assert a + b == MicroBatchSums(5, 9, 4.5)


@pytest.mark.parametrize("anisotropic", [False, True], ids=["isotropic", "anisotropic"])
@pytest.mark.parametrize("k", [2, 4, 8, 32])
def test_unbiased_on_linear_regression(k: int, anisotropic: bool) -> None:
    """Over 400 windows of ``k`` uneven micro-batches, the averaged terms are within 3
    standard errors of the closed form."""
    rng, delta, scales, sigma, trace, squared = regression(6, anisotropic, seed=k)
    traces, norms = [], []
    for _ in range(400):
        sums, total = EMPTY, 0.0
        for j in range(k):
            s = per_sample_gradients(rng, delta, scales, sigma, 1 + j % 3).sum(0)
            sums, total = sums.add(float(s @ s), 1 + j % 3), total + s
        terms = pooled_terms(sums.norm_sums(float(total @ total)))
        traces.append(terms.trace)
        norms.append(terms.squared_norm)
    for values, want in ((traces, trace), (norms, squared)):
        mean, error = np.mean(values), np.std(values, ddof=1) / math.sqrt(len(values))
        assert abs(mean - want) <= 3 * error, (mean, want, error)
