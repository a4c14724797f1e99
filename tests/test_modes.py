"""The Accumulator's distribution mode (docs/design.md, "Window mean": modes and sources as objects).

The mode is chosen once, from the model; a mode whose close measures the statistics from the
window sum it has just reduced (DDP with a source that can) runs that after the totals, and the
records are what one process's pooling before the close gives. Under one process that is checked
here with a mode that "reduces" over one rank; the two-rank runs are tests/test_ddp.py's.
"""

from __future__ import annotations

import pytest
import torch

from gradaccum import NoiseScalePlanner
from gradaccum.torch import Accumulator
from gradaccum.torch._modes import DDPMode, LocalMode, distribution_mode


class _ReducedOnOneRank(LocalMode):
    """A one-rank mode whose close measures the reduced window sum (as DDPMode with a source
    that can): the source's own sums, which over one rank are the global ones."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.order: list[str] = []

    def measures_reduced_sums(self, source):
        return True

    def window_totals(self, *args, **kwargs):
        self.order.append("totals")
        return super().window_totals(*args, **kwargs)

    def global_norm_sums(self, source, window_sums, scale, window, micro_batch):
        self.order.append("statistics")
        if self.fail:
            raise RuntimeError("a peer left")
        return source.norm_sums(window_sums, scale), source.layer_norm_sums(window_sums, scale)


def _run(mode: LocalMode | None, windows: int = 3) -> tuple[Accumulator, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    planner = NoiseScalePlanner(c=1.0, min_batch=12, max_batch=12, micro_batch=4, source="micro_batch")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), planner)
    if mode is not None:
        acc._mode = mode
    g = torch.Generator().manual_seed(1)
    for _ in range(3 * windows):
        x, y = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g, dtype=torch.float64)
        acc.backward(torch.nn.functional.mse_loss(model(x), y), 4)
    return acc, model


def test_a_plain_model_is_local() -> None:
    assert type(distribution_mode(torch.nn.Linear(2, 1), NoiseScalePlanner(
        c=1.0, min_batch=8, max_batch=8, micro_batch=4, source="micro_batch"), None)) is LocalMode
    assert not LocalMode().measures_reduced_sums(object())


def test_ddp_measures_the_reduced_sum_only_with_a_source_that_can() -> None:
    class Can:
        def global_norm_sums(self, *args):
            return None

    assert DDPMode().measures_reduced_sums(Can())
    assert not DDPMode().measures_reduced_sums(object())


def test_statistics_from_the_reduced_sum_are_taken_after_the_totals_and_equal_the_pooled_ones() -> None:
    mode = _ReducedOnOneRank()
    acc, model = _run(mode)
    want, want_model = _run(None)
    assert mode.order == ["totals", "statistics"] * 3
    assert [r.info for r in acc.history] == [r.info for r in want.history]
    assert "trace" in acc.history[-1].info and any(k.startswith("noise_scale/") for k in acc.history[-1].info)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), want_model.parameters()))


def test_a_failure_measuring_the_reduced_sum_drops_the_window_with_no_step() -> None:
    mode = _ReducedOnOneRank()
    acc, model = _run(mode, windows=1)
    before = [p.detach().clone() for p in model.parameters()]
    mode.fail = True
    g = torch.Generator().manual_seed(2)
    with pytest.raises(RuntimeError, match="a peer left") as raised:
        for _ in range(3):
            x, y = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g,
                                                                                   dtype=torch.float64)
            acc.backward(torch.nn.functional.mse_loss(model(x), y), 4)
    assert "the window is dropped and no optimizer step was taken" in str(raised.value.__notes__)
    assert acc.window_micro_batches == 0 and acc.steps == 1 and len(acc.history) == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
