"""The finiteness check that also takes each gradient's squared norm (the micro-batch source's
one pass over a micro-batch's gradient): the values against a float64 reference for every
kind of tensor it takes, and NaN/Inf caught exactly, an overflowing square of a finite
gradient included."""

from __future__ import annotations

import math

import pytest
import torch

from gradaccum.torch import _nonfinite
from gradaccum.torch._nonfinite import all_finite, squared_norms, squared_norms_if_finite


@pytest.fixture(autouse=True, params=["dot", "foreach_norm", "both"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on each path: every CPU float32/float64 tensor through ``torch.dot``, every
    tensor through ``_foreach_norm``, or the default size split (the large tensors dot)."""
    if request.param != "both":
        monkeypatch.setattr(_nonfinite, "_DOT_FROM", 0 if request.param == "dot" else 1 << 62)
    return str(request.param)


def _reference(t: torch.Tensor) -> float:
    return math.fsum(float(abs(v)) ** 2 for v in t.detach().to(torch.complex128 if t.is_complex() else
                                                               torch.float64).reshape(-1).tolist())


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(400, 400, generator=g),                    # float32, large: the default split dots it
            torch.randn(7, 300, generator=g).t(),                  # not contiguous
            torch.tensor(2.5),                                     # 0-dim
            torch.randn(50, generator=g, dtype=torch.float64),     # float64
            torch.randn(64, generator=g).to(torch.bfloat16),       # half precision: _foreach_norm, in float32
            torch.randn(3000, generator=g).to(torch.float16),      # (a norm rounded to its dtype: 1e-3 off)
            torch.randn(9, generator=g, dtype=torch.complex64)]    # complex: _foreach_norm


@pytest.mark.parametrize("which", range(7))
def test_each_kind_of_tensor_alone_matches_a_float64_sum(which: int) -> None:
    """Float32 sums (half precision too: summed and returned in float32), float64 exactly."""
    t = _tensors()[which]
    rel = 1e-12 if t.dtype == torch.float64 else 1e-5
    assert squared_norms([t]) == [pytest.approx(_reference(t), rel=rel)]


def test_mixed_dtypes_together_and_missing_gradients() -> None:
    tensors = _tensors()
    grads: list[torch.Tensor | None] = [tensors[0], None, *tensors[1:]]
    got = squared_norms_if_finite(grads)
    assert got is not None and got[1] == 0.0
    for value, t in zip([got[0], *got[2:]], tensors):
        assert value == pytest.approx(_reference(t), rel=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_non_finite_element_is_caught_in_every_dtype(bad: float, dtype: torch.dtype) -> None:
    good = torch.ones(1000, dtype=dtype)
    poisoned = torch.ones(200_000, dtype=dtype)  # large: the default split dots a float32 or float64 one
    poisoned[177_777] = bad
    assert squared_norms_if_finite([good, poisoned]) is None
    assert not all_finite([good, poisoned])


def test_a_finite_gradient_whose_square_overflows_is_kept_with_its_float64_norm() -> None:
    """Elements of 1e20 are finite in float32 but their squares are not: where the dot overflows,
    the exact element check says finite and the squared norm is taken in float64, not dropped or
    infinite (``_foreach_norm``'s float32 norm does not overflow: its square is taken in float64)."""
    big = torch.full((10,), 1e20)
    got = squared_norms_if_finite([big, torch.ones(3)])
    assert got is not None
    assert got[0] == pytest.approx(10 * float(torch.tensor(1e20)) ** 2, rel=1e-6)
    assert got[1] == pytest.approx(3.0, rel=1e-6)
