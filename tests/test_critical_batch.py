"""The critical batch size measured by branching: the fits, the branches, the refusals, and a
problem whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradaccum.experiments.critical_batch import (
    Branch,
    CriticalBatchError,
    analyse_checkpoint,
    evaluation_steps,
    fit_samples,
    fit_steps,
    fit_tradeoff,
    measure_critical_batch,
    run_branch,
    zhang_measured,
)

BATCHES = [8, 16, 32, 64, 128, 256, 512, 1024]


# ---------------------------------------------------------------------------- the fits
@pytest.mark.parametrize("s_min, b_noise", [(37.5, 123.4), (2.0, 9.0), (500.0, 3000.0)])
def test_fits_recover_an_exact_hyperbola(s_min: float, b_noise: float) -> None:
    steps = [s_min * (1 + b_noise / b) for b in BATCHES]
    samples = [b * s for b, s in zip(BATCHES, steps)]
    for fit in (fit_tradeoff(BATCHES, steps), fit_steps(BATCHES, steps), fit_samples(BATCHES, samples)):
        assert fit.s_min == pytest.approx(s_min, rel=1e-9)
        assert fit.b_noise == pytest.approx(b_noise, rel=1e-9)
        assert fit.e_min == pytest.approx(s_min * b_noise, rel=1e-9)


def test_zhang_measured_is_the_largest_batch_within_20_percent_of_linear_scaling() -> None:
    steps = [37.5 * (1 + 123.4 / b) for b in BATCHES]
    # E(B) / E(8) <= 1.2  <=>  B <= 1.2 * 8 + 0.2 * 123.4 = 34.28: 32 is the largest measured
    assert zhang_measured(BATCHES, steps) == 32


def test_the_joint_fit_weighs_relative_errors() -> None:
    """Against a slow reference: the minimiser of the summed squared relative errors of S and
    E = B S, by a fine grid search over (S_min, B_noise)."""
    rng = np.random.default_rng(3)
    steps = [40 * (1 + 100 / b) * math.exp(rng.normal(0, 0.1)) for b in BATCHES]
    fit = fit_tradeoff(BATCHES, steps)

    def cost(s_min: float, b_noise: float) -> float:
        model = [s_min * (1 + b_noise / b) for b in BATCHES]
        return sum(((s - m) / s) ** 2 + ((b * s - b * m) / (b * s)) ** 2 for b, s, m in zip(BATCHES, steps, model))

    best = cost(fit.s_min, fit.b_noise)
    for ds in (-1e-3, 1e-3):
        for db in (-1e-3, 1e-3):
            assert cost(fit.s_min * (1 + ds), fit.b_noise * (1 + db)) > best


def test_fits_refuse_fewer_than_two_batch_sizes() -> None:
    for fit in (fit_tradeoff, fit_steps, fit_samples):
        with pytest.raises(CriticalBatchError, match="batch_sizes: the fit needs at least 2 distinct"):
            fit([64], [10.0])
        with pytest.raises(CriticalBatchError, match="at least 2 distinct"):
            fit([64, 64], [10.0, 12.0])


def test_fits_refuse_what_the_model_cannot_be() -> None:
    faster = [1000 / b**1.3 for b in BATCHES]  # faster than 1/B: S_min < 0
    with pytest.raises(CriticalBatchError, match="beyond the largest batch measured"):
        fit_tradeoff(BATCHES, faster)
    rising = [10.0 + b / 100 for b in BATCHES]  # steps grow with the batch: E_min < 0
    with pytest.raises(CriticalBatchError, match="below the smallest batch measured"):
        fit_tradeoff(BATCHES, rising)
    with pytest.raises(CriticalBatchError, match="steps must be positive and finite"):
        fit_tradeoff(BATCHES[:2], [10.0, math.nan])


# ---------------------------------------------------------------------------- the branches
class Linear:
    """A deterministic loss falling by ``rate(B) * lr`` per step: every S is known exactly."""

    def __init__(self, rate: dict[int, float], nan_above: float = math.inf) -> None:
        self.rate, self.nan_above = rate, nan_above

    def restore(self, checkpoint: float) -> list[float]:
        return [checkpoint, 0]  # loss, batch size seen

    def step(self, state: list[float], batch: int, lr: float) -> list[float]:
        return [state[0] - self.rate[batch] * lr if lr <= self.nan_above else math.nan, batch]

    def loss(self, state: list[float]) -> float:
        return state[0]

    def batches(self, batch_size: int, seed: int):
        while True:
            yield batch_size


def test_evaluation_steps() -> None:
    assert evaluation_steps(5, 0.05) == [1, 2, 3, 4, 5]
    steps = evaluation_steps(400, 0.05)
    assert steps[:20] == list(range(1, 21)) and steps[-1] == 400
    assert all(b - a == max(1, math.floor(0.05 * a)) for a, b in zip(steps[:-2], steps[1:-1]))
    assert evaluation_steps(7, 0.0) == list(range(1, 8))


def test_branch_steps_are_the_interpolated_crossing() -> None:
    problem = Linear({4: 0.3})
    # loss 10 - 0.3 k reaches 10 - 50.05 at k = 166.83..., between evaluations
    branch = run_branch(problem, 10.0, 10.0, 10.0 - 50.05, 4, 1.0, 0, 1000, 0.05)
    assert branch.why == "reached" and branch.steps == pytest.approx(50.05 / 0.3, rel=1e-12)
    assert branch.samples == pytest.approx(4 * 50.05 / 0.3, rel=1e-12)
    assert branch.ran > 50.05 / 0.3  # the evaluation after the crossing


def test_branch_not_reached_and_diverged_say_so() -> None:
    problem = Linear({4: 0.3}, nan_above=1.0)
    short = run_branch(problem, 10.0, 10.0, 0.0, 4, 1.0, 0, 20, 0.05)
    assert short.steps is None and short.why == "not reached in 20 steps" and short.ran == 20
    nan = run_branch(problem, 10.0, 10.0, 0.0, 4, 2.0, 0, 20, 0.05)
    assert nan.steps is None and nan.why == "diverged at step 1"


def test_a_batch_size_that_never_reaches_the_drop_is_refused_not_dropped() -> None:
    problem = Linear({8: 0.1, 16: 0.2, 32: 0.0})
    with pytest.raises(CriticalBatchError, match=r"checkpoint 0: batch size 32: no learning rate reached the drop "
                                                 r"in every seed \(lr 1: seed 0 not reached in 100 steps"):
        measure_critical_batch(problem, [10.0], [8, 16, 32], [1.0], 5.0, seeds=[0], max_steps=100, bootstrap=0)


def test_measure_refuses_bad_settings() -> None:
    problem = Linear({8: 0.1, 16: 0.2})
    for kwargs, match in (({"batch_sizes": [8]}, "batch_sizes: at least 2 distinct"),
                          ({"batch_sizes": [8, 8]}, "batch_sizes: at least 2 distinct"),
                          ({"drop": -1.0}, "drop: the loss drop"),
                          ({"drop": [1.0, 1.0]}, "one for all checkpoints or one per checkpoint"),
                          ({"lrs": []}, "lrs: batch size 8 needs a non-empty grid"),
                          ({"seeds": []}, "seeds: at least one"),
                          ({"max_steps": 0}, "max_steps must be a positive integer")):
        args = {"batch_sizes": [8, 16], "lrs": [1.0], "drop": 1.0, **kwargs}
        with pytest.raises(CriticalBatchError, match=match):
            measure_critical_batch(problem, [10.0], args["batch_sizes"], args["lrs"], args["drop"],
                                   **{k: v for k, v in kwargs.items() if k in ("seeds", "max_steps")})


def _branch(b: int, lr: float, seed: int, steps: float | None) -> Branch:
    return Branch(0, b, lr, seed, steps, "reached" if steps else "not reached in 1000 steps", 0)


def test_the_best_learning_rate_reaches_in_every_seed_with_the_fewest_mean_steps() -> None:
    runs = [_branch(16, 1e-3, 0, 100.0), _branch(16, 1e-3, 1, 110.0),
            _branch(16, 2e-3, 0, 90.0), _branch(16, 2e-3, 1, 95.0),
            _branch(16, 4e-3, 0, 50.0), _branch(16, 4e-3, 1, None),  # fastest seed, but one seed missed
            _branch(64, 1e-3, 0, 60.0), _branch(64, 1e-3, 1, 60.0),
            _branch(64, 2e-3, 0, 40.0), _branch(64, 2e-3, 1, 44.0),
            _branch(64, 4e-3, 0, 30.0), _branch(64, 4e-3, 1, 31.0)]
    result = analyse_checkpoint(runs, 2.0, 0.5, bootstrap=50)
    assert result.batch_sizes == [16, 64] and result.lr == [2e-3, 4e-3]
    assert result.steps == [92.5, 30.5] and result.seed_steps == [[90.0, 95.0], [30.0, 31.0]]
    assert result.samples == [16 * 92.5, 64 * 30.5]
    assert result.lr_at_edge == [64]  # its best lr is the grid's largest: widen the grid there
    exact = fit_tradeoff([16, 64], [92.5, 30.5])
    assert result.b_noise == pytest.approx(exact.b_noise, rel=1e-12) and result.b_crit == pytest.approx(
        result.b_noise, rel=1e-12)
    low, high = result.b_noise_interval
    assert low <= result.b_noise <= high


def test_analyse_refuses_a_missing_branch() -> None:
    runs = [_branch(16, 1e-3, 0, 100.0), _branch(16, 1e-3, 1, 110.0), _branch(64, 1e-3, 0, 60.0)]
    with pytest.raises(CriticalBatchError, match="batch size 64 lacks some"):
        analyse_checkpoint(runs, 2.0, 0.5)


# ---------------------------------------------------------------------------- a known answer
class Quadratic:
    """``L(x) = h x^2 / 2`` with per-sample gradients ``(1 + xi) h x``, ``xi ~ N(0, s^2)``.

    The gradient's covariance is ``Sigma = s^2 G G^T``, so ``B_noise = tr(H Sigma) / G^T H G =
    s^2`` at every point, and the per-step optimal learning rate is ``eps_max / (1 + B_noise / B)``
    with ``eps_max = 1 / h`` (McCandlish et al. 2018, section 2.2). At ``kappa`` times that rate
    the expected decrease of ``log L`` per step is ``kappa (2 + kappa) / (1 + B_noise / B)`` up to
    ``O(kappa^3)``: the steps to a fixed drop follow ``S = S_min (1 + B_noise / B)`` with
    ``S_min = log(L0 / target) / (kappa (2 + kappa))``.
    """

    def __init__(self, h: float, s: float) -> None:
        self.h, self.s = h, s

    def restore(self, checkpoint: float) -> float:
        return float(checkpoint)

    def step(self, x: float, batch: np.ndarray, lr: float) -> float:
        return x - lr * self.h * x * (1 + float(batch.mean()))

    def loss(self, x: float) -> float:
        return 0.5 * self.h * x * x

    def batches(self, batch_size: int, seed: int):
        rng = np.random.default_rng(seed)
        while True:
            yield rng.normal(0.0, self.s, batch_size)


@pytest.mark.parametrize("s", [5.0, 10.0])
def test_the_critical_batch_of_a_quadratic_is_recovered(s: float) -> None:
    """B_noise = s^2 recovered within 5 % (200 seeds: the first-passage steps' spread and their
    overshoot leave about 2 %), S_min within 5 % of the closed form, and the bootstrap interval
    holds the truth."""
    h, kappa, nats = 2.0, 0.1, 3.0
    b_noise = s * s
    batch_sizes = [round(b_noise * f) for f in (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16)]
    problem = Quadratic(h, s)
    [result] = measure_critical_batch(problem, [1.0], batch_sizes, lambda b: [kappa / (h * (1 + b_noise / b))],
                                      problem.loss(1.0) * (1 - math.exp(-nats)), seeds=range(200), max_steps=5000,
                                      bootstrap=100)
    assert result.b_noise == pytest.approx(b_noise, rel=0.05)
    assert result.s_min == pytest.approx(nats / (kappa * (2 + kappa)), rel=0.05)
    for separate in (result.b_noise_steps, result.b_noise_samples):
        assert separate == pytest.approx(b_noise, rel=0.05)
    low, high = result.b_noise_interval
    assert low <= b_noise <= high
    assert result.b_zhang == pytest.approx(1.2 * batch_sizes[0] + 0.2 * result.b_noise)


def test_a_learning_rate_not_scaled_with_the_batch_does_not_give_the_noise_scale() -> None:
    """The control: one learning rate for every batch size (the rate optimal at B_noise): the
    steps barely fall with the batch, and the fit is refused or lands far from s^2."""
    h, s, kappa = 2.0, 10.0, 0.1
    problem = Quadratic(h, s)
    try:
        [result] = measure_critical_batch(problem, [1.0], [12, 25, 50, 100, 200, 400, 800, 1600], [kappa / (2 * h)],
                                          problem.loss(1.0) * (1 - math.exp(-3.0)), seeds=range(50),
                                          max_steps=5000, bootstrap=0)
    except CriticalBatchError as error:
        assert "B_noise is below the smallest batch measured" in str(error)
    else:
        assert not 0.8 < result.b_noise / s**2 < 1.25


# ---------------------------------------------------------------------------- PyTorch: the online noise scales
def _tiny(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(96, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (96,))
    return model, (x, y)


def _mean_ce(model, batch):
    import torch

    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _stream(data, size: int):
    from gradaccum.experiments.critical_batch_torch import sample_batches

    return sample_batches(data, size, 7)


def _count(batch) -> tuple[int, int]:
    return len(batch[1]), len(batch[1])


def _flat_grad(model, batch) -> np.ndarray:
    import torch

    grads = torch.autograd.grad(_mean_ce(model, batch), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).numpy()


def test_the_weighted_estimator_is_the_micro_batch_formula_against_a_slow_reference() -> None:
    """tr(P Sigma) = b sum_j |g_j - g|_P^2 / (k - 1), G^T P G = |g|_P^2 - tr / n, per window, the
    terms averaged over windows (float64, explicit loops)."""
    import torch

    from gradaccum.experiments.critical_batch_torch import weighted_noise_scale

    model, data = _tiny()
    weights = [torch.rand_like(p) + 0.1 for p in model.parameters()]
    p_flat = torch.cat([w.reshape(-1) for w in weights]).numpy()
    got = weighted_noise_scale(model, _mean_ce, _stream(data, 8), 4, 3, weights, lambda b: len(b[1]))
    stream, traces, squares = _stream(data, 8), [], []
    for _ in range(3):
        g = np.stack([_flat_grad(model, next(stream)) for _ in range(4)])
        mean = g.mean(0)
        trace = 8 * sum(float(((gj - mean) ** 2 * p_flat).sum()) for gj in g) / 3
        traces.append(trace)
        squares.append(float((mean**2 * p_flat).sum()) - trace / 32)
    assert got["trace"] == pytest.approx(np.mean(traces), rel=1e-10)
    assert got["squared_norm"] == pytest.approx(np.mean(squares), rel=1e-10)
    assert got["b_simple"] == pytest.approx(np.mean(traces) / np.mean(squares), rel=1e-10)


def test_unweighted_it_is_the_accumulators_micro_batch_source() -> None:
    from gradaccum.experiments.critical_batch_torch import accumulator_noise_scale, weighted_noise_scale

    model, data = _tiny(1)
    ours = weighted_noise_scale(model, _mean_ce, _stream(data, 8), 4, 3, None, lambda b: len(b[1]))
    library = accumulator_noise_scale(model, _mean_ce, _stream(data, 8), 4, 3, "micro_batch", _count)
    assert ours["b_simple"] == pytest.approx(library["b_simple"], rel=1e-9)


def test_the_per_sample_source_averages_the_windows_terms_against_a_slow_reference() -> None:
    import torch

    from gradaccum.experiments.critical_batch_torch import accumulator_noise_scale

    model, data = _tiny(2)
    got = accumulator_noise_scale(model, _mean_ce, _stream(data, 8), 2, 3, "per_sample", _count)
    stream, traces, squares = _stream(data, 8), [], []
    for _ in range(3):
        x, y = (torch.cat(t) for t in zip(*[next(stream) for _ in range(2)]))
        g = np.stack([_flat_grad(model, (x[i:i + 1], y[i:i + 1])) for i in range(16)])
        trace = float(((g - g.mean(0)) ** 2).sum()) / 15
        traces.append(trace)
        squares.append(float((g.mean(0) ** 2).sum()) - trace / 16)
    assert got["b_simple"] == pytest.approx(np.mean(traces) / np.mean(squares), rel=1e-9)
    # the ratio of averaged terms, not the mean of the windows' ratios
    assert got["b_simple"] != pytest.approx(np.mean(np.array(traces) / np.array(squares)), rel=1e-6)


def test_online_measurement_and_branches_leave_the_checkpoint_as_it_was() -> None:
    import torch

    from gradaccum.experiments.critical_batch_torch import TorchProblem, checkpoint, online_noise_scales

    model, data = _tiny(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    problem = TorchProblem(_mean_ce, data, data)
    state = (model, optimizer)
    for batch in [next(_stream(data, 16)) for _ in range(3)]:
        problem.step(state, batch, 1e-2)
    saved = checkpoint(model, optimizer)
    before = [p.detach().clone() for p in saved[0].parameters()]
    v_before = [saved[1].state[p]["exp_avg_sq"].clone() for p in saved[0].parameters()]
    online = online_noise_scales(saved, _mean_ce, lambda: _stream(data, 8), 2, 2, _count)
    assert set(online) == {"per_sample", "micro_batch", "adam"}
    branch = problem.restore(saved)
    problem.step(branch, next(_stream(data, 16)), 1e-2)
    assert all(torch.equal(a, p) for a, p in zip(before, saved[0].parameters()))
    assert all(torch.equal(v, saved[1].state[p]["exp_avg_sq"]) for v, p in zip(v_before, saved[0].parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(before, branch[0].parameters()))


def test_the_lm_critical_batch_starts_from_the_lm_fronts_smallest_batch() -> None:
    from gradaccum.experiments.critical_batch_section import PLANS
    from gradaccum.experiments.reproduce import LM_INCREMENT

    for quick in (False, True):
        plan = PLANS[("lm", quick)]
        assert plan.batch == LM_INCREMENT == min(plan.batch_sizes)
