"""The float32 per-element statistics against a float64 computation over a whole run.

A training run of the reference MLP (Adam, increments of 32, windows of 8 increments) in
float32 through the Accumulator; at every decision the mean GSNR the rule sees is compared with
the same definition evaluated in float64 on per-sample gradients computed in float64 from the
same weights and data. The live-element floor is the float32 one in both (the definition's
floor depends on the dtype: docs/design.md, "Edge cases"). Measured: 1.4e-7 relative at most
on the classifier; the test holds 1e-5. A regression run whose output bias has a per-sample
GSNR near 1e5 tests the precision guard (docs/design.md, "Moments"): within 1e-4 with it,
1e-2 off without it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradaccum import Decision
from gradaccum._core.moments import Moments
from gradaccum._core.statistics import mean_gsnr
from gradaccum.torch import Accumulator, PerSampleGradStats
from gradaccum.torch._stats import _blocks, _guard
from gradaccum.torch._stats._layers import _embedding_values, _linear_values
from gradaccum.torch._stats._registry import lookup

INCREMENT, PER_WINDOW, WINDOWS = 32, 8, 3


class Seen:
    """FixedSteps(PER_WINDOW) that records the mean GSNR (mean scale) at every decision."""

    needs_statistics = True

    def __init__(self) -> None:
        self.values: list[float] = []

    def decide(self, window) -> Decision:
        n = window.statistics[0].n
        self.values.append(mean_gsnr(window.statistics, "mean").value if n > 1 else math.nan)
        return Decision(window.micro_batches >= PER_WINDOW, {})


def float64_gsnr(per_sample: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The mean GSNR (mean scale) of float64 per-sample gradients with float32's live floor, and
    the largest per-sample GSNR of an element (an element whose samples are all zero counts 0)."""
    moments = []
    for g in per_sample.values():
        mean = g.mean(0)
        moments.append(Moments(len(g), mean, ((g - mean) ** 2).sum(0)))
    n = moments[0].n
    largest = max(float((m.mean ** 2 + m.m2 / n).max()) for m in moments)
    floor = max((256 * torch.finfo(torch.float32).eps) ** 2 * largest, torch.finfo(torch.float32).tiny)
    total, count, highest = 0.0, 0, 0.0
    for m in moments:
        var = m.m2 / (n - 1)
        live = var > floor
        total += float((m.mean[live] ** 2 / var[live]).sum())
        count += int(live.sum())
        highest = max(highest, float((m.mean ** 2 / var).nan_to_num(0).max()))
    return n * total / count, highest


# (task, first increment) -> the window's float32 weights and its float64 values at each decision
REFERENCES: dict[tuple[bool, int], tuple[list[torch.Tensor], list[tuple[float, float]]]] = {}


def window_reference(model: nn.Module, criterion, regression: bool, x: torch.Tensor, y: torch.Tensor,
                     first: int) -> list[tuple[float, float]]:
    """``float64_gsnr`` at each decision of the window of increments ``first`` onwards (samples
    ``x``, ``y``): per-sample gradients in float64 at the window's weights, the decision's
    samples the first ``INCREMENT * (j + 1)``. The reference is a function of the weights and the
    data only, so a run that reaches the very same weights (the other kernels, the run without
    the guard: the statistics decide only where a window ends) reuses it."""
    weights = [p.detach().clone() for p in model.parameters()]
    cached = REFERENCES.get((regression, first))
    if cached is not None and all(torch.equal(a, b) for a, b in zip(cached[0], weights, strict=True)):
        return cached[1]
    twin = copy.deepcopy(model).double()
    params = {name: p.detach() for name, p in twin.named_parameters()}

    def loss(p, xi, yi):
        target = yi[None].double() if regression else yi[None]
        return criterion(functional_call(twin, p, (xi[None].double(),)), target)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    values = [float64_gsnr({name: g[:INCREMENT * (j + 1)] for name, g in per_sample.items()})
              for j in range(PER_WINDOW)]
    REFERENCES[(regression, first)] = (weights, values)
    return values


def float32_and_float64_gsnr(regression: bool) -> tuple[list[float], list[float], float]:
    """The run's decisions in float32 and in float64, and the largest per-sample GSNR of an
    element at a decision (the regression's output bias: targets near 30, outputs near 0)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 40, generator=g)
    y = torch.randint(0, 10, (INCREMENT * PER_WINDOW * WINDOWS,), generator=g)
    x = centers[y] + 1.5 * torch.randn(len(y), 40, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 1 if regression else 10))
    if regression:
        x = torch.randn(len(y), 40, generator=g)
        y = 30.0 + 0.1 * torch.randn(len(y), 1, generator=g)  # type: ignore[assignment]
        with torch.no_grad():
            model[4].weight.mul_(0.01)
    criterion = nn.functional.mse_loss if regression else nn.functional.cross_entropy
    rule = Seen()
    acc = Accumulator(model, torch.optim.Adam(model.parameters(), lr=1e-4 if regression else 3e-3), rule)
    want: list[float] = []
    largest = 0.0
    for k in range(PER_WINDOW * WINDOWS):
        xb, yb = x[k * INCREMENT:(k + 1) * INCREMENT], y[k * INCREMENT:(k + 1) * INCREMENT]
        if k % PER_WINDOW == 0:  # the weights of this window
            window = slice(k * INCREMENT, (k + PER_WINDOW) * INCREMENT)
            for value, highest in window_reference(model, criterion, regression, x[window], y[window], k):
                want.append(value)
                largest = max(largest, highest)
        acc.backward(criterion(model(xb), yb), INCREMENT)
    return rule.values, want, largest


@pytest.mark.slow
def test_float32_gsnr_equals_float64_over_a_training_run(kernels: str) -> None:
    got, want, _ = float32_and_float64_gsnr(regression=False)
    assert len(got) == len(want) == PER_WINDOW * WINDOWS
    errors = [abs(a - b) / b for a, b in zip(got, want)]
    assert max(errors) < 1e-5, max(errors)
    assert min(want) > 0.5  # a real signal: the comparison is not of near-zero numbers
    assert max(errors) > 0  # float32 really ran


@pytest.mark.slow
def test_elements_above_gsnr_1e4_within_1e_4_thanks_to_the_guard(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    got, want, largest = float32_and_float64_gsnr(regression=True)
    errors = [abs(a - b) / b for a, b in zip(got, want)]
    assert largest > 1e4 and min(want) > 10  # the output bias dominates the mean GSNR
    assert max(errors) < 1e-4, max(errors)
    monkeypatch.setattr(_guard, "TOLERANCE", 1e30)  # no element flagged: the raw one-pass form
    got, again, _ = float32_and_float64_gsnr(regression=True)
    assert again == want  # the same weights: the float64 reference is as before
    assert max(abs(a - b) / b for a, b in zip(got, want)) > 1e-3  # what the guard prevents


class Paths(nn.Module):
    """Every per-element path: embedding rows, LayerNorm and a Linear over positions (per-sample
    gradients), a GRU (no registry entry: the fallback), a 2-D Linear head (the extra GEMM)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.mix(self.norm(self.embed(tokens))))
        return self.head(h.mean(1))


def worst_high_gsnr_m2_error() -> dict[str, float]:
    """Per parameter, the largest relative error of M2 (two increments of 32, merged) over its
    elements with a per-sample GSNR above 100, against two-pass float64 on the same float32
    per-sample gradients."""
    torch.manual_seed(0)
    model = Paths()
    stats = PerSampleGradStats(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (64, 5), generator=g)
    target = 30.0 + 0.1 * torch.randn(64, 1, generator=g)
    for part in (slice(0, 32), slice(32, 64)):
        model.zero_grad()
        ((model(tokens[part]) - target[part]) ** 2).sum().backward()
        stats.commit()
    assert set(stats.paths.values()) == {"embedding:sum_squares", "layer_norm:per_sample", "linear:per_sample",
                                         "loop", "linear:sum_squares"}
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(((model(tokens[i:i + 1]) - target[i:i + 1]) ** 2).sum(), list(params.values()))
            for i in range(64)]
    worst = {}
    for j, (name, m) in enumerate(zip(params, stats.moments())):
        v = torch.stack([r[j] for r in rows]).double()
        m2 = ((v - v.mean(0)) ** 2).sum(0)
        high = v.mean(0) ** 2 / (m2 / 63) > 100
        if high.any():
            worst[name] = float(((m.m2.double() - m2).abs() / m2)[high].max())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True, "blocks"], ids=["foreach", "chunked", "blocks"])
def test_guard_recomputes_flagged_elements_on_every_path(chunked: bool | str, kernels: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if chunked is True:  # the large-model path: one parameter at a time, in chunks through a scratch buffer
        monkeypatch.setattr(_guard, "FOREACH_BELOW", 0)
        monkeypatch.setattr(_guard, "CHUNK", 7)
    if chunked == "blocks":  # the commit in blocks of 20 elements: rows of a parameter, or small ones together
        monkeypatch.setattr(_blocks, "BLOCK", 20)
    worst = worst_high_gsnr_m2_error()
    assert {"norm.bias", "mix.bias", "gru.bias_ih_l0", "head.bias"} <= set(worst)
    assert max(worst.values()) < 1e-5, worst
    monkeypatch.setattr(_guard, "TOLERANCE", 1e30)
    assert max(worst_high_gsnr_m2_error().values()) > 1e-4  # without the guard


@pytest.mark.parametrize("layer, make", [
    (nn.Linear(5, 3), lambda: (torch.randn(7, 5),)),
    (nn.Linear(5, 3), lambda: (torch.randn(7, 4, 5),)),
    (nn.Embedding(6, 3, padding_idx=2), lambda: (torch.randint(0, 6, (7, 4)),)),
])
def test_values_at_indices_equal_the_per_sample_gradients(layer: nn.Module, make) -> None:
    torch.manual_seed(0)
    args = make()
    d = torch.randn(*layer(*args).shape)
    entry = lookup(layer)
    assert entry is not None and entry.values in (_linear_values, _embedding_values)
    full = entry.per_sample(layer, args, d)
    for name, g in full.items():
        index = torch.randperm(g[0].numel())[:9]
        torch.testing.assert_close(entry.values(layer, args, d, name, index), g.reshape(len(g), -1)[:, index],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [1 << 18, 4, 8], ids=["one_block", "one_row_per_block", "two_rows_per_block"])
def test_flagged_elements_of_a_later_block_are_recomputed_at_their_own_rows(block: int,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A Linear(4, 3) whose rows 1 and 2 have elements of per-sample GSNR near 1e8 (the input's
    first column and the output gradient of those rows nearly constant): in blocks of one or two
    rows they are flagged in blocks that start past row 0, and must be recomputed from their own
    rows' per-sample values (row 0's would be another element's)."""
    monkeypatch.setattr(_blocks, "BLOCK", block)
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    stats = PerSampleGradStats(layer)
    x = torch.randn(64, 4)
    x[:, 0] = 1.0 + 1e-4 * torch.randn(64)
    weights = torch.tensor([0.0, 3.0, -2.0])
    out = layer(x)  # one increment: the new window's merge adds nothing to its M2
    ((out * weights).sum() + 0.5 * (out[:, 0] ** 2).sum()).backward()
    stats.commit()
    per_sample = []
    for row in x:
        out = layer(row[None])
        per_sample.append(torch.autograd.grad((out * weights).sum() + 0.5 * (out[:, 0] ** 2).sum(),
                                              layer.weight)[0].double())
    v = torch.stack(per_sample)
    want = ((v - v.mean(0)) ** 2).sum(0)
    gsnr = v.mean(0) ** 2 / (want / 63)
    assert gsnr[1:, 0].min() > 1e6 and gsnr[0].max() < 1e3  # rows 1 and 2 flagged, row 0 not
    raw = (v.float() ** 2).sum(0) - v.float().sum(0) ** 2 / 64  # the unguarded one-pass form in float32
    assert float(((raw[1:, 0] - want[1:, 0]).abs() / want[1:, 0]).min()) > 1e-2
    got = stats.moments()[0].m2.double()
    assert float(((got - want).abs() / want).max()) < 1e-5
