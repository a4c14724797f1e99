"""Python numbers take Python's float arithmetic in the core's helpers (no round trip through
arrays): the same numbers as the array path gives, edge cases included."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gradaccum import NormTest
from gradaccum._core.arrays import ratio_or_inf
from gradaccum._core.statistics import where_enough

VALUES = (0.0, -0.0, 1.5, -2.0, 3e-320, 1e308, math.inf, -math.inf, math.nan)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize(("a", "b"), list(itertools.product(VALUES, VALUES)))
def test_ratio_or_inf_on_python_numbers_is_the_array_result(a: float, b: float) -> None:
    host = ratio_or_inf(a, b)
    with np.errstate(all="ignore"):
        array = float(ratio_or_inf(np.asarray(a), np.asarray(b)))
    assert type(host) is float
    assert _same(host, array), (a, b, host, array)


def test_where_enough_on_python_numbers() -> None:
    assert where_enough(2, 0.5) == 0.5
    assert math.isnan(where_enough(1, 0.5))
    assert math.isnan(float(where_enough(np.asarray(1), np.asarray(0.5))))
    assert float(where_enough(np.asarray(3), np.asarray(0.5))) == 0.5


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize(("n", "trace", "squared"), [(1, 3.0, 1.5), (2, 3.0, 1.5), (64, 10.0, 0.01), (300, 3.0, -1.0),
                                                     (128, 0.0, 0.0), (40, math.nan, 1.0), (40, 5.0, math.inf)])
def test_a_rule_decides_the_same_on_python_numbers_and_on_arrays(unbiased: bool, n: int, trace: float,
                                                                   squared: float) -> None:
    rule = NormTest(0.5, unbiased=unbiased, max_samples=256, min_samples=8)
    stop, info = rule.decision_from_terms(n, trace, squared)
    with np.errstate(all="ignore"):
        stop_a, info_a = rule.decision_from_terms(np.asarray(n), np.asarray(trace), np.asarray(squared))
    assert type(stop) is bool and stop == bool(stop_a)
    for key, value in info.items():
        assert type(value) in (bool, int, float)
        assert _same(float(value), float(info_a[key])), key


@pytest.mark.parametrize("count", [np.int64(4), np.asarray(4), np.asarray(1)])
def test_a_numpy_count_with_python_terms_decides_as_a_python_count(count: object) -> None:
    rule = NormTest(0.5)
    stop, info = rule.decision_from_terms(count, 1.0, 2.0)
    want_stop, want = rule.decision_from_terms(int(count), 1.0, 2.0)  # type: ignore[call-overload]
    assert stop == want_stop
    for key, value in want.items():
        assert _same(float(info[key]), float(value)), key
