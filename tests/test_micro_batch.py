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


# ---------------------------------------------------------------- through the torch Accumulator

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradaccum import Decision, NoiseScalePlanner, NormTest, WindowView  # noqa: E402
from gradaccum._core.noise_scale import NormStatistics  # noqa: E402
from gradaccum.torch import Accumulator  # noqa: E402


class RecordWindow:
    """FixedSteps(k) on the micro-batch source that keeps what it was shown."""

    needs_statistics = True
    statistics = "norms"
    source = "micro_batch"

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen: list[NormStatistics] = []

    def decide(self, window: WindowView) -> Decision:
        self.seen.append(window.statistics)
        return Decision(window.micro_batches >= self.k, {})


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _loop(model: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[float, float, int]:
    """The formula, by hand: each micro-batch's gradient sum from its own backward, in float64."""
    params = list(model.parameters())
    sums, sizes = [], []
    for loss_sum, b in ((summed, b) for summed, _, b in parts):
        grads = torch.autograd.grad(loss_sum, params)
        sums.append(torch.cat([g.reshape(-1) for g in grads]))
        sizes.append(b)
    total, n, k = sum(sums), sum(sizes), len(sums)
    trace = (sum(float(s @ s) / b for s, b in zip(sums, sizes)) - float(total @ total) / n) / (k - 1)
    return trace, float(total @ total) / n**2 - trace / n, n


def micro_batch_terms(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, int]:
    """``_loop`` over micro-batches of a classifier's cross-entropy (each micro-batch's summed loss)."""
    return _loop(model, [(nn.functional.cross_entropy(model(x), y, reduction="sum"), None, len(y)) for x, y in batches])


def test_window_terms_equal_a_float64_loop_over_uneven_micro_batches() -> None:
    model = _mlp()
    rule = RecordWindow(3)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    assert acc.stats is None  # no hooks on the model
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g))
               for b in (3, 6, 1)]
    for x, y in batches:
        acc.backward(nn.functional.cross_entropy(model(x), y), len(y))
    parts = [(nn.functional.cross_entropy(model(x), y, reduction="sum"), None, len(y)) for x, y in batches]
    trace, squared, n = _loop(model, parts)
    seen = rule.seen[-1]
    assert seen.samples == n == acc.history[-1].samples
    assert seen.trace == pytest.approx(trace, rel=1e-10)
    assert seen.squared_norm == pytest.approx(squared, rel=1e-9, abs=1e-12 * trace)


def test_token_weighted_terms_are_per_sample_with_samples_given() -> None:
    """An LM's micro-batches: ``count`` tokens in ``samples`` sequences; the terms are in units
    of one sequence's summed loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Tanh(), nn.Linear(6, 11)).double()
    rule = RecordWindow(2)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    g = torch.Generator().manual_seed(5)
    batches = []
    for b in (2, 3):
        x = torch.randint(0, 11, (b, 7), generator=g)
        y = torch.randint(0, 11, (b, 7), generator=g)
        y[torch.rand(b, 7, generator=g) < 0.4] = -100
        y[:, 0] = 1
        batches.append((x, y))
    parts = [(nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1), ignore_index=-100,
                                          reduction="sum"), None, len(x)) for x, y in batches]
    trace, squared, n = _loop(model, parts)
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1), ignore_index=-100)
        acc.backward(loss, int((y != -100).sum()), samples=len(x))
    assert rule.seen[-1].samples == n == 5
    assert rule.seen[-1].trace == pytest.approx(trace, rel=1e-10)
    assert rule.seen[-1].squared_norm == pytest.approx(squared, rel=1e-9, abs=1e-12 * trace)


def test_a_window_of_one_micro_batch_has_no_variance_and_the_norm_test_waits_for_a_second() -> None:
    model = _mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      NormTest(10.0, increment=4, max_samples=64, source="micro_batch"))
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert not acc.backward(nn.functional.cross_entropy(model(x), y), 4)  # theta 10 passes any measured window
    assert acc.backward(nn.functional.cross_entropy(model(x), y), 4)
    assert acc.history[-1].micro_batches == 2 and acc.history[-1].info["norm_test"] <= 1.0


class Custom(nn.Module):
    """A layer the per-sample registry has no formula for, with dropout inside."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(torch.tanh(x @ self.w), 0.3, self.training) + x


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own import
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_any_model_compiled_or_with_dropout(compiled: bool) -> None:
    """No hooks: a custom layer with active dropout, compiled or not, measured per micro-batch
    (the terms equal the loop's over the same dropout masks: the seed is replayed)."""
    torch.manual_seed(0)
    model = nn.Sequential(Custom(), nn.Linear(5, 3)).double()
    run = torch.compile(model) if compiled else model
    rule = RecordWindow(2)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g))
               for b in (4, 2)]
    for k, (x, y) in enumerate(batches):
        torch.manual_seed(100 + k)
        acc.backward(nn.functional.cross_entropy(run(x), y), len(y))
    parts = []
    for k, (x, y) in enumerate(batches):
        torch.manual_seed(100 + k)
        parts.append((nn.functional.cross_entropy(run(x), y, reduction="sum"), None, len(y)))
    trace, squared, _ = _loop(model, parts)
    assert rule.seen[-1].trace == pytest.approx(trace, rel=1e-9)
    assert rule.seen[-1].squared_norm == pytest.approx(squared, rel=1e-8, abs=1e-12 * trace)


def test_a_grad_scaler_is_divided_out() -> None:
    seen = []
    for scaled in (False, True):
        model = _mlp()
        rule = RecordWindow(2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule, scaler=scaler)
        g = torch.Generator().manual_seed(7)
        for b in (3, 5):
            x, y = torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)
            acc.backward(nn.functional.cross_entropy(model(x), y), b)
        seen.append(rule.seen[-1])
    assert seen[1].trace == pytest.approx(seen[0].trace, rel=1e-12)
    assert seen[1].squared_norm == pytest.approx(seen[0].squared_norm, rel=1e-10)


def test_a_mid_window_state_resumes_to_the_same_window() -> None:
    def run(resume: bool) -> dict:
        model = _mlp()
        planner = NoiseScalePlanner(c=1.0, min_batch=6, max_batch=30, micro_batch=3, source="micro_batch")
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), planner)
        g = torch.Generator().manual_seed(8)
        for i in range(14):
            if resume and i == 5:
                state = acc.state_dict()
                model2 = _mlp()
                model2.load_state_dict(model.state_dict())
                model = model2
                acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), planner)
                acc.load_state_dict(state)
            x, y = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
            acc.backward(nn.functional.cross_entropy(model(x), y), 3)
        return {"history": [r.as_dict() for r in acc.history],
                "weights": [p.detach().clone() for p in model.parameters()]}

    a, b = run(False), run(True)
    assert a["history"] == b["history"]
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert all(r["micro_batches"] >= 2 for r in a["history"])


def test_a_state_of_another_source_is_refused() -> None:
    model = _mlp()
    per_sample = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0),
                             NormTest(0.5, increment=3, source="per_sample"))
    per_sample.backward(nn.functional.cross_entropy(model(torch.randn(3, 5, dtype=torch.float64)),
                                                    torch.tensor([0, 1, 2])), 3)
    state = per_sample.state_dict()
    per_sample.stats.remove()
    other = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0),
                        NormTest(0.5, increment=3, source="micro_batch"))
    with pytest.raises(ValueError, match="micro_batch"):
        other.load_state_dict(state)
    assert other.window_micro_batches == 0


def test_planners_refuse_a_micro_batch_source_that_cannot_measure() -> None:
    with pytest.raises(ValueError, match="2 \\* micro_batch"):
        NoiseScalePlanner(c=1.0, min_batch=4, max_batch=4, micro_batch=4, source="micro_batch")
    with pytest.raises(ValueError, match="source"):
        NormTest(0.5, source="hooks")
