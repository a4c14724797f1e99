"""The applied gradient equals the full-batch mean gradient, for any split (float64, 1e-10).

Anchors that got this wrong, and that these tests pin down (docs/design.md, "Window mean"):
averaging per-micro-batch mean losses over k (Transformers PR #34191, #37766) fails the
uneven-split and ignore_index cases; dividing a short last window by k (Lightning
#19987) or dropping it (Transformers PR #29561) fails the flush case.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradaccum import FixedSteps
from gradaccum.torch import Accumulator

from .reference import (
    GradCapture,
    TinySeqModel,
    ce_mean,
    classification,
    full_batch_grad,
    mlp,
    split,
    take,
    tokens,
)


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-10) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def sizes_strategy(n: int) -> st.SearchStrategy[list[int]]:
    """Random compositions of n: includes all-ones, uneven sizes, and the whole batch."""
    return st.lists(st.booleans(), min_size=n - 1, max_size=n - 1).map(lambda cuts: _composition(n, cuts))


def _composition(n: int, cuts: list[bool]) -> list[int]:
    sizes, current = [], 1
    for cut in cuts:
        if cut:
            sizes.append(current)
            current = 1
        else:
            current += 1
    sizes.append(current)
    assert sum(sizes) == n
    return sizes


def run_one_window(model, data, sizes, nonfinite: str = "raise") -> list[torch.Tensor]:
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(len(sizes)), nonfinite=nonfinite)
    stepped = []
    for sl in split(len(data), sizes):
        loss, count = ce_mean(model, take(data, sl))
        stepped.append(acc.backward(loss, count))
    assert stepped == [False] * (len(sizes) - 1) + [True]
    assert len(opt.seen) == 1
    return opt.seen[0]


@settings(max_examples=25, deadline=None)
@given(sizes=sizes_strategy(13))
def test_mlp_any_split_equals_full_batch(sizes: list[int]) -> None:
    data = classification(13)
    model = mlp()
    want = full_batch_grad(model, data)
    assert_grads_close(run_one_window(model, data, sizes), want)


@pytest.mark.parametrize("nonfinite", ["raise", "skip_micro_batch", "skip_window"])
def test_mlp_named_splits(nonfinite: str) -> None:
    """Every policy (buffered window sums, or in place in .grad for skip_window) is exact."""
    data = classification(12)
    for sizes in ([1] * 12, [12], [5, 1, 6], [11, 1], [3, 3, 3, 3]):
        model = mlp()
        want = full_batch_grad(model, data)
        assert_grads_close(run_one_window(model, data, sizes, nonfinite), want)


@settings(max_examples=15, deadline=None)
@given(sizes=sizes_strategy(9))
def test_per_token_loss_with_ignore_index_equals_full_batch(sizes: list[int]) -> None:
    data = tokens(9)
    model = TinySeqModel()
    want = full_batch_grad(model, data)
    assert_grads_close(run_one_window(model, data, sizes), want)


def test_averaging_micro_batch_means_would_be_wrong_here() -> None:
    """The test problem really discriminates: the naive mean-of-means differs."""
    data = tokens(9)
    model = TinySeqModel()
    want = full_batch_grad(model, data)
    naive = [torch.zeros_like(p) for p in model.parameters()]
    slices = split(9, [2, 7])
    for sl in slices:
        loss, _ = ce_mean(model, take(data, sl))
        for acc_g, g in zip(naive, torch.autograd.grad(loss, list(model.parameters()))):
            acc_g += g / len(slices)
    assert max(float((a - b).abs().max()) for a, b in zip(naive, want)) > 1e-4


def test_several_windows_and_short_last_window_via_flush() -> None:
    data = classification(23)
    model = mlp()
    reference = mlp()
    opt = GradCapture(model.parameters())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    acc = Accumulator(model, opt, FixedSteps(3))
    sizes = [4, 2, 3, 5, 1, 2, 4, 2]  # windows: (4,2,3) (5,1,2) and a short (4,2)
    windows = [slice(0, 9), slice(9, 17), slice(17, 23)]
    for sl in split(23, sizes):
        loss, count = ce_mean(model, take(data, sl))
        acc.backward(loss, count)
    assert len(opt.seen) == 2 and acc.window_micro_batches == 2 and acc.window_items == 6
    assert acc.flush() is True
    assert acc.window_micro_batches == 0 and acc.flush() is False
    assert [r.items for r in acc.history] == [9, 8, 6]
    assert [r.reason for r in acc.history] == ["rule", "rule", "flush"]
    for got, window in zip(opt.seen, windows):
        want = full_batch_grad(reference, take(data, window))
        assert_grads_close(got, want)
        ref_opt.zero_grad()
        for p, g in zip(reference.parameters(), want):
            p.grad = g
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


def test_flush_drop_discards_partial_window() -> None:
    data = classification(10)
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accumulator(model, GradCapture(model.parameters()), FixedSteps(4))
    for sl in split(10, [5, 5]):
        loss, count = ce_mean(model, take(data, sl))
        acc.backward(loss, count)
    assert acc.flush(drop=True) is False
    assert acc.window_items == 0 and acc.history == []
    assert all(p.grad is None for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("form", ["sum_reduction", "tensor_count"])
def test_sum_reduced_losses_and_tensor_counts_are_exact(form: str) -> None:
    """``reduction="sum"`` losses, and counts given as integer tensors (counted tokens)."""
    data = classification(8) if form == "sum_reduction" else tokens(8)
    model = mlp() if form == "sum_reduction" else TinySeqModel()
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(2))
    want = full_batch_grad(model, data)
    for sl in split(8, [3, 5]):
        part = take(data, sl)
        if form == "sum_reduction":
            loss = torch.nn.functional.cross_entropy(model(part.x), part.y, reduction="sum")
            acc.backward(loss, len(part), reduction="sum")
        else:
            acc.backward(ce_mean(model, part)[0], (part.labels != -100).sum())
    assert_grads_close(opt.seen[0], want)


@pytest.mark.parametrize("nonfinite", ["raise", "skip_window"])
def test_state_dict_round_trip_mid_window(nonfinite: str) -> None:
    data = classification(12)
    model = mlp()
    want = full_batch_grad(model, data)
    acc = Accumulator(model, GradCapture(model.parameters()), FixedSteps(3), nonfinite=nonfinite)
    acc.backward(*ce_mean(model, take(data, slice(0, 5))))
    state = acc.state_dict()
    fresh = mlp()
    fresh.load_state_dict(model.state_dict())
    opt = GradCapture(fresh.parameters())
    acc2 = Accumulator(fresh, opt, FixedSteps(3), nonfinite=nonfinite)
    acc2.load_state_dict(state)
    assert acc2.window_items == 5 and acc2.window_micro_batches == 1
    for sl in (slice(5, 9), slice(9, 12)):
        acc2.backward(*ce_mean(fresh, take(data, sl)))
    assert_grads_close(opt.seen[0], want)
