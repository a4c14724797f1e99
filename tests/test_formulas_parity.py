"""The statistics' formulas are written once (gradaccum._core, array API); numpy, torch and
jax.numpy run the same code and must decide the same windows, edge cases included.

Before, Chan's merge, the mean GSNR and the window bounds had three copies that
disagreed: float32 moments whose M2 is denormal (1e-40) gave GSNR inf in the core and
JAX and 1.5 in torch. Each edge case here is defined in docs/design.md ("Edge cases").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gradaccum import GSNR, NormTest, WindowView
from gradaccum._core.moments import Moments, chan_merge, moments_from_sums
from gradaccum._core.statistics import live_elements
from gradaccum.torch._stats._merge import merge_sums_into

RULES = [GSNR(0.5, increment=2, max_samples=64), GSNR(1.5, increment=2, max_samples=64, scale="mean"),
         NormTest(0.8, increment=2, max_samples=64)]


def case(name: str, dtype: str) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
    """(n, means, m2s) of a named edge case."""
    rng = np.random.default_rng(0)
    means = [rng.normal(size=(4, 3)), rng.normal(size=(5,))]
    m2s = [rng.random(size=(4, 3)) * 10, rng.random(size=(5,)) * 10]
    n = 12
    if name == "zeros":
        means = [np.zeros_like(m) for m in means]
        m2s = [np.zeros_like(m) for m in m2s]
    elif name == "denormal_m2":
        m2s[0][:] = 1e-40  # below float32's smallest normal: a zero variance, on every backend
        m2s[1][:] = 1e-40
    elif name == "dead_units":
        means[0][0] = 0.0
        m2s[0][0] = 0.0
    elif name == "rounding_noise":  # a bias whose gradient is zero up to rounding (attention keys)
        means[1][:2] = 1e-22
        m2s[1][:2] = 1e-40
    elif name == "high_gsnr":  # elements far above the noise floor: mu^2 / var ~ 1e6
        m2s[0][1] = means[0][1] ** 2 * 1e-6 * (n - 1)
    elif name == "inf":
        m2s[1][3] = np.inf
    elif name == "single_sample":
        n = 1
        m2s = [np.zeros_like(m) for m in m2s]
    return n, [m.astype(dtype) for m in means], [m.astype(dtype) for m in m2s]


CASES = ["random", "zeros", "denormal_m2", "dead_units", "rounding_noise", "high_gsnr", "inf", "single_sample"]


def decide(rule, xp_name: str, n: int, means, m2s):
    if xp_name == "numpy":
        stop, info = rule.decision(n, means, m2s)
    elif xp_name == "torch":
        stop, info = rule.decision(n, [torch.from_numpy(m) for m in means], [torch.from_numpy(m) for m in m2s])
    else:  # jax, traced under jit with a traced count
        fn = jax.jit(lambda k, a, b: rule.decision(k, a, b))
        stop, info = fn(jnp.asarray(n, jnp.int32), [jnp.asarray(m) for m in means], [jnp.asarray(m) for m in m2s])
    key = "gsnr" if isinstance(rule, GSNR) else "norm_test"
    return bool(stop), float(info[key]), int(info.get("zero_variance_elements", 0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rule", RULES, ids=["gsnr_sample", "gsnr_mean", "norm_test"])
def test_numpy_torch_and_jax_decide_alike(rule, name: str, dtype: str) -> None:
    n, means, m2s = case(name, dtype)
    results = {xp: decide(rule, xp, n, means, m2s) for xp in ("numpy", "torch", "jax")}
    stops = {r[0] for r in results.values()}
    assert len(stops) == 1, results
    values = [r[1] for r in results.values()]
    if math.isnan(values[0]) or math.isinf(values[0]):
        assert all(repr(v) == repr(values[0]) for v in values), results
    else:
        rtol = 1e-5 if dtype == "float32" else 1e-12
        assert values == pytest.approx([values[0]] * 3, rel=rtol), results
    assert len({r[2] for r in results.values()}) == 1, results


def test_edge_cases_are_defined() -> None:
    """The definitions, not the hardware: denormal variance and rounding noise are dead
    elements, non-finite moments give NaN (no rule stops on it), one sample gives NaN."""
    gsnr = GSNR(0.5, increment=2, max_samples=64)
    n, means, m2s = case("denormal_m2", "float32")
    _, info = gsnr.decision(n, means, m2s)
    assert info["zero_variance_elements"] == 17 and float(info["gsnr"]) == 0.0
    n, means, m2s = case("rounding_noise", "float64")
    assert info_of(gsnr, n, means, m2s)["zero_variance_elements"] == 2
    n, means, m2s = case("inf", "float64")
    stop, info = gsnr.decision(n, means, m2s)
    assert math.isnan(float(info["gsnr"])) and not bool(stop)
    n, means, m2s = case("single_sample", "float64")
    stop, info = gsnr.decision(n, means, m2s)
    assert math.isnan(float(info["gsnr"])) and not bool(stop)
    n, means, m2s = case("high_gsnr", "float32")
    assert bool(live_elements(means[0], m2s[0], n)[1].all())  # strong signal is live, not noise


def info_of(rule, n, means, m2s):
    return rule.decision(n, means, m2s)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_fused_merge_equals_the_core_chan_merge(dtype, kernels: str) -> None:
    """The torch hot path merges in place with foreach kernels; the core's ``chan_merge``
    is the definition. Held equal over increments of 1, 3 and 5 samples, zeros included."""
    g = torch.Generator().manual_seed(1)
    state = None
    core: Moments | None = None
    for size in (3, 1, 5, 2):
        per_sample = [torch.randn(size, 4, 3, generator=g, dtype=dtype), torch.zeros(size, 5, dtype=dtype)]
        per_sample[0][:, 0] = 7.0  # identical across samples: zero variance, large mean
        firsts = [p.sum(0) for p in per_sample]
        seconds = [(p * p).sum(0) for p in per_sample]
        inc = [moments_from_sums(size, f.double().numpy(), s.double().numpy()) for f, s in zip(firsts, seconds)]
        state = merge_sums_into(state, firsts, [s.clone() for s in seconds], size)
        core = inc if core is None else [chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2) for a, b in zip(core, inc)]
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, want in zip(state, core):
        assert got.n == want.n == 11
        np.testing.assert_allclose(got.mean.double().numpy(), want.mean, rtol=rtol, atol=1e-6 if rtol > 1e-6 else 1e-12)
        np.testing.assert_allclose(got.m2.double().numpy(), want.m2, rtol=rtol, atol=1e-4 if rtol > 1e-6 else 1e-10)


def test_chan_merge_with_an_empty_side_returns_the_other() -> None:
    a = Moments(4, np.array([1.0, 2.0]), np.array([0.5, 0.25]))
    empty = Moments(0, np.zeros(2), np.zeros(2))
    for merged in (chan_merge(*a, *empty), chan_merge(*empty, *a)):
        assert merged.n == 4
        np.testing.assert_array_equal(merged.mean, a.mean)
        np.testing.assert_array_equal(merged.m2, a.m2)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("scale", ["sample", "mean"])
@pytest.mark.parametrize("chunk", [1 << 18, 3])  # whole parameters, and pieces of 3 elements
def test_torch_fused_gsnr_equals_the_definition(name: str, scale: str, chunk: int, kernels: str, monkeypatch) -> None:
    """torch runs a fused, in-place version of ``gsnr_of`` on large models, in pieces of at most
    CHUNK elements; on every edge case it gives the definition's value, live count and skipped
    count."""
    from gradaccum._core import statistics
    from gradaccum.torch._stats import _fused, _reductions

    monkeypatch.setattr(statistics, "FLAT_BELOW", 0)  # take the fused path even for these small arrays
    monkeypatch.setattr(_reductions, "CHUNK", chunk)
    n, means, m2s = case(name, "float64")
    t_means, t_m2s = [torch.from_numpy(m) for m in means], [torch.from_numpy(m) for m in m2s]
    fused = _reductions.Reductions(_fused.Kernels()).gsnr_of(t_means, t_m2s, n, scale)
    plain = statistics.gsnr_of(t_means, t_m2s, n, scale)
    got, want = float(fused[0]), float(plain[0])
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12)
    if not math.isnan(want):
        assert int(fused[1]) == int(plain[1]) and int(fused[2]) == int(plain[2])


def test_compiled_kernels_run_from_a_million_elements_on_contiguous_cpu_floats() -> None:
    """Where the fused kernels run by default (``_fused.FUSED_FROM``): large enough models, CPU,
    float32/float64, contiguous operands; elsewhere the foreach code."""
    from gradaccum.torch._stats import _fused

    big = [torch.zeros(1 << 19), torch.zeros(1 << 19)]
    kernels = _fused.Kernels()
    assert kernels.for_operands(big) is kernels
    assert kernels.for_operands([big[0]]) is None  # below 2^20 elements in all
    assert kernels.for_operands([t.half() for t in big]) is None
    assert kernels.for_operands(big, [torch.zeros(1 << 10, 4).T]) is None  # a non-contiguous operand
    assert kernels.for_operands(big, [torch.zeros(0)]) is None


def test_kernels_that_do_not_compile_fall_back_to_foreach(monkeypatch, caplog) -> None:
    """A machine where the kernels do not compile (no C++ compiler) gets the foreach code, with
    one warning, and the same moments and decisions bitwise."""
    from gradaccum.torch import PerSampleGradStats
    from gradaccum.torch._stats import _fused

    def run() -> tuple[list, float, PerSampleGradStats]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        stats = PerSampleGradStats(model)
        x = torch.randn(24, 6)
        for part in (slice(0, 8), slice(8, 24)):
            model.zero_grad()
            model(x[part]).square().sum().backward()
            stats.commit()
        moments = stats.moments()
        info = GSNR(1.0, increment=8).decide(WindowView(2, 24, moments)).info
        return moments, float(info["gsnr"]), stats

    want, want_gsnr, _ = run()  # below FUSED_FROM: foreach

    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(_fused, "FUSED_FROM", 0)
    monkeypatch.setattr(_fused.torch, "compile", broken)
    with caplog.at_level("WARNING", logger="gradaccum"):
        got, got_gsnr, stats = run()
    assert "do not compile here" in caplog.text and "no C++ compiler" in caplog.text
    kernels = stats._statistic.kernels
    assert kernels.broken is not None and kernels.for_operands([torch.zeros(8)]) is None
    assert got_gsnr == want_gsnr
    for a, b in zip(got, want):
        assert a.n == b.n and torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)


def test_the_decision_reads_the_merges_maximum_while_the_moments_are_unchanged(monkeypatch) -> None:
    """With the fused kernels the merge takes the floor's ``max(mu^2 + M2 / n)`` block by block,
    and the decision makes one pass (its ratios): the same maximum and the same decision as its
    own pass, and its own pass again as soon as a moment changes in place or a state is loaded."""
    from torch import nn

    from gradaccum._core.statistics import mean_gsnr
    from gradaccum.torch import PerSampleGradStats
    from gradaccum.torch._stats import _blocks, _fused, _reductions

    monkeypatch.setattr(_fused, "FUSED_FROM", 0)
    monkeypatch.setattr(_blocks, "BLOCK", 100)  # several blocks: rows of the weights, the biases together
    passes = []
    own_pass = _reductions._Fused.largest
    monkeypatch.setattr(_reductions._Fused, "largest", lambda self, n: passes.append(n) or own_pass(self, n))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
    stats = PerSampleGradStats(model)
    reductions = stats._statistic.reductions
    x = torch.randn(3, 16, 12)
    for k, part in enumerate(x):  # a new window's first increment, then two merges
        model.zero_grad(set_to_none=True)
        model(part).square().sum().backward()
        stats.commit()
        moments = stats.moments()
        recalled = reductions.recall([m.mean for m in moments], [m.m2 for m in moments], float(stats.count))
        assert recalled is not None, k
        means, m2s = [m.mean for m in moments], [m.m2 for m in moments]
        assert float(recalled) == float(own_pass(_reductions._Fused(reductions.kernels, means, m2s), stats.count))
        decided = mean_gsnr(moments, "mean").value
        assert passes == []  # one pass: the maximum came from the merge
        reductions.forget()
        assert mean_gsnr(moments, "mean").value == decided and len(passes) == 1
        passes.clear()
    reductions.remember_largest(moments, torch.tensor(math.nan))  # a stale value, if it were read
    moments[0].m2.mul_(1.0)  # any in-place change
    assert math.isfinite(mean_gsnr(moments, "mean").value) and len(passes) == 1
    stats.load_state_dict(stats.state_dict())
    assert math.isfinite(mean_gsnr(stats.moments(), "mean").value) and len(passes) == 2
