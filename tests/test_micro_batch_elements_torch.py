"""Per-element rules (``GSNR``, ``GSNRPlanner``) with ``source="micro_batch"`` on the torch Accumulator.

The window's element moments and the rule's decisions against a float64 loop over uneven
micro-batches' own gradients (``k`` micro-batches, ``n`` samples: per-element variance
``(sum_j b_j g_j^2 - n gbar^2) / (k - 1)``), a window of one micro-batch, a compiled model and
one with dropout, a checkpoint mid-window, and the refusal under DistributedDataParallel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradaccum import GSNR, GSNRPlanner
from gradaccum.torch import Accumulator
from gradaccum.torch import _accumulator as accumulator_module
from gradaccum.torch._modes import DDPMode

SIZES = (3, 6, 1, 4, 2)
NEVER = {"increment": 1, "max_samples": 10**6}  # decides every micro-batch, never stops before its cap


def _model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(5, 3)).double()


def _batches(sizes=SIZES, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [(torch.tensor(rng.normal(size=(b, 4))), torch.tensor(rng.integers(0, 3, size=b))) for b in sizes]


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout masks in the Accumulator and in the loop
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _loop(model: torch.nn.Module, batches) -> tuple[list[np.ndarray], list[int]]:
    """Each micro-batch's gradient sum ``S_j`` (flattened, float64) and samples ``b_j``."""
    sums = []
    for j, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        (_loss(model, batch, 100 + j) * len(batch[1])).backward()
        sums.append(np.concatenate([p.grad.detach().numpy().ravel() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return sums, [len(b[1]) for b in batches]


def _reference(sums: list[np.ndarray], sizes: list[int]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """By the definitions: the mean and the per-sample variance per element, k and n."""
    k, n = len(sums), sum(sizes)
    mean = sum(sums) / n
    squares = sum(b * (s / b) ** 2 for s, b in zip(sums, sizes))  # sum_j b_j g_j^2
    return mean, (squares - n * mean**2) / (k - 1), k, n


def _gsnr(mean: np.ndarray, variance: np.ndarray, n: int, scale: str) -> float:
    return float(np.mean(mean**2 / variance)) * (n if scale == "mean" else 1)


def _flat(moments) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([m.mean.detach().numpy().ravel() for m in moments]),
            np.concatenate([m.m2.detach().numpy().ravel() for m in moments]))


def _accumulator(model: torch.nn.Module, rule, run: torch.nn.Module | None = None) -> Accumulator:
    return Accumulator(run if run is not None else model, torch.optim.SGD(model.parameters(), lr=0.1), rule)


@pytest.mark.parametrize("scale", ["sample", "mean"])
def test_element_moments_and_gsnr_equal_a_float64_loop_over_uneven_micro_batches(scale: str) -> None:
    model, batches = _model(), _batches()
    acc = _accumulator(model, GSNR(1e12, scale=scale, source="micro_batch", **NEVER))
    for j, batch in enumerate(batches):
        assert not acc.backward(_loss(model, batch, 100 + j), len(batch[1]))
        if j == 0:
            continue
        mean, variance, k, n = _reference(*_loop(model, batches[: j + 1]))
        moments = acc.source.moments()
        assert all(m.n == n for m in moments)
        got_mean, got_m2 = _flat(moments)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-10, atol=1e-14)
        # the rules read m2 / (n - 1) as the per-sample variance
        np.testing.assert_allclose(got_m2 / (n - 1), variance, rtol=1e-9, atol=1e-14)
        decision = acc.rule.decide(_view(acc))
        assert decision.info["gsnr"] == pytest.approx(_gsnr(mean, variance, n, scale), rel=1e-9)


def _view(acc: Accumulator):
    from gradaccum._core import WindowView

    return WindowView(acc.window_micro_batches, acc.window_items, acc._window_statistics())


def test_the_window_closes_where_the_float64_loop_says() -> None:
    """From the 4th micro-batch on (``min_samples``), a threshold just below the reference's GSNR
    of the 4-micro-batch window closes it there, with that GSNR in its record; just above, it
    does not close there (the next window's GSNR is lower still)."""
    model, batches = _model(), _batches()
    values = []
    for j in range(1, len(batches)):
        mean, variance, _, n = _reference(*_loop(model, batches[: j + 1]))
        values.append(_gsnr(mean, variance, n, "mean"))
    assert values[3] < values[2]
    min_samples = sum(SIZES[:4])
    for factor, closes in ((1 - 1e-6, True), (1 + 1e-6, False)):
        model = _model()
        acc = _accumulator(model, GSNR(values[2] * factor, scale="mean", source="micro_batch", increment=1,
                                       min_samples=min_samples, max_samples=10**6))
        stepped = [acc.backward(_loss(model, b, 100 + j), len(b[1])) for j, b in enumerate(batches)]
        assert stepped == [False, False, False, closes, False]
        if closes:
            assert acc.history[0].info["gsnr"] == pytest.approx(values[2], rel=1e-9)
            assert acc.history[0].micro_batches == 4


def test_a_window_of_one_micro_batch_does_not_pass() -> None:
    model, batches = _model(), _batches()
    acc = _accumulator(model, GSNR(1e-12, source="micro_batch", **NEVER))
    assert not acc.backward(_loss(model, batches[0], 100), len(batches[0][1]))
    moments = acc.source.moments()
    assert all(bool(torch.isnan(m.m2).all()) for m in moments)
    assert math.isnan(acc.rule.decide(_view(acc)).info["gsnr"])
    assert acc.backward(_loss(model, batches[1], 101), len(batches[1][1]))  # two micro-batches: any GSNR passes
    assert acc.history[0].micro_batches == 2


def test_a_planner_reads_the_window_terms() -> None:
    model, batches = _model(), _batches()
    acc = _accumulator(model, GSNRPlanner(4.0, min_batch=15, max_batch=60, micro_batch=5, source="micro_batch"))
    assert acc.planned_micro_batches == 3
    for j, batch in enumerate(batches[:3]):
        acc.backward(_loss(model, batch, 100 + j), len(batch[1]))
    assert len(acc.history) == 1
    mean, variance, _, n = _reference(*_loop(_model(), batches[:3]))
    info = acc.history[0].info
    assert info["samples"] == n
    assert info["trace"] == pytest.approx(float(variance.sum()), rel=1e-9)
    assert info["squared_norm"] == pytest.approx(float(mean @ mean) - float(variance.sum()) / n, rel=1e-9)


@pytest.mark.parametrize("variant", ["dropout", "compiled"])
def test_a_compiled_model_or_one_with_dropout_works(variant: str) -> None:
    model = _model(dropout=0.3 if variant == "dropout" else 0.0)
    run = torch.compile(model, backend="eager") if variant == "compiled" else model
    batches = _batches()
    acc = _accumulator(model, GSNR(1e12, source="micro_batch", **NEVER), run)
    for j, batch in enumerate(batches):
        acc.backward(_loss(run, batch, 100 + j), len(batch[1]))
    mean, variance, _, n = _reference(*_loop(model, batches))
    got_mean, got_m2 = _flat(acc.source.moments())
    np.testing.assert_allclose(got_mean, mean, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got_m2 / (n - 1), variance, rtol=1e-9, atol=1e-14)


def test_a_checkpoint_mid_window_resumes_bitwise() -> None:
    batches = _batches((3, 6, 1, 4, 2, 5, 3))
    rule = GSNR(3.0, scale="mean", source="micro_batch", increment=1, max_samples=40)

    def run(resume_at: int | None) -> list[torch.Tensor]:
        model = _model()
        acc = _accumulator(model, rule)
        for j, batch in enumerate(batches):
            if j == resume_at:
                state = acc.state_dict()
                assert state["statistics"]["m2"] is not None
                params = [p.detach().clone() for p in model.parameters()]
                opt_state = acc.optimizer.state_dict()
                model = _model(seed=9)
                with torch.no_grad():
                    for p, q in zip(model.parameters(), params):
                        p.copy_(q)
                acc = _accumulator(model, rule)
                acc.optimizer.load_state_dict(opt_state)
                acc.load_state_dict(state)
            acc.backward(_loss(model, batch, 100 + j), len(batch[1]))
        acc.flush()
        return [p.detach().clone() for p in model.parameters()] + [torch.tensor(
            [r.micro_batches for r in acc.history])]

    straight = run(None)
    for at in (2, 4):
        resumed = run(at)
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_a_state_without_the_elements_m2_is_refused() -> None:
    model, batches = _model(), _batches()
    norms = _accumulator(model, GSNR(1e12, source="micro_batch", **NEVER))
    norms.backward(_loss(model, batches[0], 100), len(batches[0][1]))
    state = norms.state_dict()
    del state["statistics"]["m2"]
    fresh = _accumulator(model, GSNR(1e12, source="micro_batch", **NEVER))
    with pytest.raises(ValueError, match="saved with source='micro_batch'"):
        fresh.load_state_dict(state)
    assert fresh.window_micro_batches == 0


def test_ddp_refuses_per_element_rules_from_micro_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DistributedDataParallel each rank's decision would read only its own micro-batches."""
    monkeypatch.setattr(accumulator_module, "distribution_mode", lambda model, rule, scaler: DDPMode())
    model = _model()
    planner = GSNRPlanner(4.0, min_batch=8, max_batch=64, micro_batch=4, source="micro_batch")
    for rule in (GSNR(1.0, source="micro_batch"), planner):
        with pytest.raises(ValueError, match="source='micro_batch'.*DistributedDataParallel.*source='per_sample'"):
            _accumulator(model, rule)


def test_a_grad_scaler_is_divided_out_of_the_element_moments() -> None:
    """With a GradScaler the micro-batches' gradients arrive scaled; the element moments (and the
    GSNR read from them) are those of the unscaled run, measured after unscaling."""
    seen = []
    for scaled in (False, True):
        model, batches = _model(), _batches()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          GSNR(1e12, scale="mean", source="micro_batch", **NEVER), scaler=scaler)
        for j, batch in enumerate(batches):
            acc.backward(_loss(model, batch, 100 + j), len(batch[1]))
        seen.append((_flat(acc.source.moments()), acc.rule.decide(_view(acc)).info["gsnr"]))
    (mean0, m20), gsnr0 = seen[0]
    (mean1, m21), gsnr1 = seen[1]
    np.testing.assert_allclose(mean1, mean0, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(m21, m20, rtol=1e-10, atol=1e-16)
    assert gsnr1 == pytest.approx(gsnr0, rel=1e-10)
    mean, variance, _, n = _reference(*_loop(_model(), batches))
    np.testing.assert_allclose(m21 / (n - 1), variance, rtol=1e-9, atol=1e-14)
