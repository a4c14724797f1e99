"""The norm path: NormTest and the noise scale from per-sample gradient norms.

No per-element moments: the collector sums ``|g_i|^2`` over the window's samples (nn.Linear:
``|x_i|^2 |d_i|^2``, or the Gram form over positions) and the window's gradient sum gives
``|S1|^2``. Everything is held against a loop over samples in float64, on the zoo of real
model patterns, with the same exactness checks as the per-element path.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradaccum import Decision, NormTest, WindowView
from gradaccum._core.moments import Moments
from gradaccum._core.noise_scale import NormStatistics, NormSums, noise_terms, pooled_terms
from gradaccum.torch import Accumulator, PerSampleGradStats

from . import zoo
from .test_zoo import branch_switch, reference


class RecordNorms:
    """FixedSteps(k) on the norm path that keeps what it was shown at every decision."""

    needs_statistics = True
    statistics = "norms"

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen: list[NormStatistics] = []

    def decide(self, window: WindowView) -> Decision:
        self.seen.append(window.statistics)
        return Decision(window.micro_batches >= self.k, {})


def loop_terms(moments: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> tuple[float, float]:
    trace, squared = noise_terms(n, [m for m, _ in moments], [m2 for _, m2 in moments])
    return float(trace), float(squared)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_norm_statistics_equal_the_per_sample_loop(name: str) -> None:
    """Two increments (4 and 3 samples) with nanoGPT's decay groups: ``tr(Sigma)`` and
    ``|G|^2`` after each equal those of the loop's per-sample gradients to 1e-9."""
    pattern = zoo.ZOO[name]
    model = zoo.build(name)
    rule = RecordNorms(2)
    acc = Accumulator(model, torch.optim.SGD(zoo.decay_groups(model), lr=0.0), rule)
    assert acc.stats is not None and acc.stats.statistics == "norms"
    increments = [pattern.batch(4, 1), pattern.batch(3, 2)]
    switch = branch_switch(model)
    for k, batch in enumerate(increments):
        switch(k)
        acc.backward(pattern.losses(model, batch).sum(), pattern.items(batch), reduction="sum")
    for seen, count in zip(rule.seen, (4, 7)):
        want = loop_terms(reference(model, pattern, increments[: 1 if count == 4 else 2], acc._params, switch), count)
        assert seen.samples == count
        assert seen.trace == pytest.approx(want[0], rel=1e-9)
        assert seen.squared_norm == pytest.approx(want[1], rel=1e-9, abs=1e-12 * want[0])


def test_linear_layers_take_the_closed_forms() -> None:
    """2-D input: ``|x|^2 |d|^2``; a sequence: the Gram form when it is cheaper, else the
    per-sample gradient; both through the ``linear:norms`` path, exact against the loop."""
    for positions, width in ((1, 6), (3, 16), (40, 2)):  # 40 positions x (2+2) > 2 x 2: per-sample gradients
        torch.manual_seed(positions)
        layer = nn.Linear(width, width).double()
        x = torch.randn(5, positions, width, dtype=torch.float64).squeeze(1)
        stats = PerSampleGradStats(layer, statistics="norms")
        (layer(x) ** 3).sum().backward()
        stats.commit()
        assert stats.paths == {"Linear": "linear:norms"}
        want = 0.0
        for i in range(5):
            grads = torch.autograd.grad((layer(x[i:i + 1]) ** 3).sum(), list(layer.parameters()))
            want += sum(float((g * g).sum()) for g in grads)
        assert sum(stats._norm_totals) == pytest.approx(want, rel=1e-12)


def test_the_statistics_argument_names_what_is_measured() -> None:
    """``statistics=`` says what is measured, as the rules and the Monitor say it; ``kind=`` is not an
    argument, and a bad value names ``statistics``."""
    layer = nn.Linear(3, 2).double()
    assert PerSampleGradStats(layer, statistics="norms").statistics == "norms"
    assert PerSampleGradStats(nn.Linear(3, 2)).statistics == "elements"
    with pytest.raises(TypeError, match="unexpected keyword argument 'kind'"):
        PerSampleGradStats(nn.Linear(3, 2), kind="norms")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="statistics"):
        PerSampleGradStats(nn.Linear(3, 2), statistics="moments")


def test_norm_test_on_the_norm_path_decides_as_on_moments() -> None:
    """NormTest reads NormStatistics through the Accumulator and moments through the
    definition: the same decision and ratio on the same window (and the unbiased form)."""
    pattern = zoo.ZOO["nanogpt"]
    for unbiased in (False, True):
        model = zoo.build("nanogpt")
        rule = NormTest(0.9, increment=4, max_samples=64, unbiased=unbiased, source="per_sample")
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
        batches = [pattern.batch(4, k) for k in range(3)]
        for batch in batches:  # the mean over the micro-batch's tokens, and its token count
            acc.backward(pattern.losses(model, batch).sum() / pattern.items(batch), pattern.items(batch))
        moments = reference(model, pattern, batches[: acc.history[0].micro_batches if acc.history else 3],
                            acc._params)
        n = 4 * (acc.history[0].micro_batches if acc.history else 3)
        stop, info = rule.decide(WindowView(n // 4, 0, [Moments(n, m, m2) for m, m2 in moments]))
        assert acc.history, "theta 0.9 passes within 3 increments here"
        got = acc.history[0].info
        assert got["norm_test"] == pytest.approx(info["norm_test"], rel=1e-9)
        assert got["noise_scale"] == pytest.approx(info["noise_scale"], rel=1e-9)
        assert stop


def test_pooled_terms_are_the_one_process_estimates_and_unbiased_over_groups() -> None:
    """One group: ``pooled_terms`` is ``noise_terms`` of the window. Several groups (ranks):
    the norm sums add up and the estimates stay unbiased (Monte Carlo, known answer)."""
    rng = torch.Generator().manual_seed(0)
    g = torch.randn(9, 6, generator=rng, dtype=torch.float64) + 0.7
    s1 = g.sum(0)
    one = pooled_terms(NormSums.of(9, float((g * g).sum()), float((s1 * s1).sum())))
    mean = g.mean(0)
    want = noise_terms(9, [mean], [((g - mean) ** 2).sum(0)])
    assert one.trace == pytest.approx(float(want.trace), rel=1e-12)
    assert one.squared_norm == pytest.approx(float(want.squared_norm), rel=1e-12)
    # per-sample gradients G + noise with tr(Sigma) = 6 * 4 = 24, |G|^2 = 6 * 0.25 = 1.5
    traces, squares = [], []
    for _ in range(4000):
        total = NormSums(0, 0, 0, 0, 0)
        for n in (3, 5):  # two ranks with different sample counts
            x = 0.5 + 2.0 * torch.randn(n, 6, generator=rng, dtype=torch.float64)
            s = x.sum(0)
            total = total + NormSums.of(n, float((x * x).sum()), float((s * s).sum()))
        pooled = pooled_terms(total)
        traces.append(pooled.trace)
        squares.append(pooled.squared_norm)
    for values, true in ((traces, 24.0), (squares, 1.5)):
        t = torch.tensor(values)
        assert abs(float(t.mean()) - true) < 3 * float(t.std()) / math.sqrt(len(values))


def test_norm_state_resumes_mid_window_and_refuses_bad_state() -> None:
    pattern = zoo.ZOO["mlp"]
    runs = []
    for resume in (False, True):
        model = zoo.build("mlp")
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          NormTest(0.3, increment=4, max_samples=16, source="per_sample"))
        for k in range(6):
            if resume and k == 2:
                state = acc.state_dict()
                acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                  NormTest(0.3, increment=4, max_samples=16, source="per_sample"))
                acc.load_state_dict(state)
            batch = pattern.batch(4, k)
            acc.backward(pattern.losses(model, batch).mean(), len(batch))
        runs.append(([r.info for r in acc.history], [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) >= 1
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    state = acc.state_dict()
    size = len(acc._params)
    for bad, match in ((("x", [1.0] * size), "sample count"), ((4, [-1.0] * size), "finite float >= 0"),
                       ((4, [math.nan] * size), "finite"), ((4, [1.0]), f"a list of {size} floats")):
        broken = {**state, "statistics": {"norms": bad}}
        before = acc.state_dict()
        with pytest.raises(ValueError, match=match):
            acc.load_state_dict(broken)
        assert acc.state_dict()["statistics"] == before["statistics"]
    with pytest.raises(ValueError, match="norm path keeps no per-element moments"):
        acc.stats.moments()  # type: ignore[union-attr]


def test_the_check_still_moves_a_functional_tied_head_to_the_model_fallback() -> None:
    """The norm path runs the same explained-gradient check: nanoGPT's ``F.linear(h, wte.weight)``
    is caught and its norms come from the whole model per sample (exact, as above)."""
    pattern = zoo.ZOO["nanogpt"]
    model = zoo.build("nanogpt")
    stats = PerSampleGradStats(model, statistics="norms")
    batch = pattern.batch(5, 3)
    pattern.losses(model, batch).sum().backward()
    stats.commit()
    assert stats.paths["wte"] == "embedding:norms"
    assert stats.paths["wte.weight"].startswith("model:")


@pytest.mark.parametrize("name", ["mlp", "nanogpt_modules", "resnet_groupnorm"])
def test_per_layer_noise_scales_equal_the_loop_and_add_up_to_the_model(name: str) -> None:
    """Each closed window records ``noise_scale/<layer>``, the layer's own ``B_simple``, equal
    to the loop's over that layer's parameters in float64; the layers' terms add up to the
    model's (so the model's noise scale lies between the layers' smallest and largest)."""
    pattern = zoo.ZOO[name]
    model = zoo.build(name)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), RecordNorms(2))
    increments = [pattern.batch(4, 1), pattern.batch(3, 2)]
    for batch in increments:
        acc.backward(pattern.losses(model, batch).sum(), pattern.items(batch), reduction="sum")
    info = acc.history[0].info
    layers = {k[len("noise_scale/"):]: v for k, v in info.items() if k.startswith("noise_scale/")}
    owners = dict(zip(map(id, acc._params), acc.stats._owners))  # type: ignore[union-attr]
    assert set(layers) == set(owners.values()) and len(layers) > 2
    moments = reference(model, pattern, increments, acc._params)
    totals, positive = [0.0, 0.0], True
    for layer, value in layers.items():
        mine = [m for p, m in zip(acc._params, moments) if owners[id(p)] == layer]
        trace, squared = loop_terms(mine, 7)
        totals[0] += trace
        totals[1] += squared
        positive &= squared > 0
        assert value == pytest.approx(trace / squared if squared > 0 else math.inf, rel=1e-8)
    whole = loop_terms(moments, 7)
    assert totals == pytest.approx(list(whole), rel=1e-9)
    if positive:  # a mediant of positive fractions lies between them
        assert min(layers.values()) <= whole[0] / whole[1] <= max(layers.values())


def test_grad_scaler_on_the_norm_path_equals_no_scaler() -> None:
    """The increment's squared norms are unscaled by the scale's square and the window sum's
    norm by the scale: with a GradScaler the same windows, ratios and weights as without."""
    pattern = zoo.ZOO["mlp"]
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = zoo.build("mlp")
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          NormTest(0.7, increment=4, max_samples=16, source="per_sample"), scaler=scaler)
        for k in range(14):
            batch = pattern.batch(4, 20 + k)
            acc.backward(pattern.losses(model, batch).mean(), 4)
        runs.append(([r.items for r in acc.history], [r.info.get("norm_test") for r in acc.history],
                     [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and len(set(runs[0][0])) > 1
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-9)
    for a, b in zip(runs[0][2], runs[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
