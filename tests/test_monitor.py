"""Monitor: the noise scale (and GSNR) of an unchanged training loop, measured only (issue 13)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradaccum._core.moments import Moments
from gradaccum._core.noise_scale import NoiseScaleEMA, noise_terms
from gradaccum._core.statistics import mean_gsnr
from gradaccum.cli import main
from gradaccum.torch import Monitor

from . import zoo
from .test_zoo import reference

DIM, NOISE, OFFSET, BATCH = 6, 0.5, 0.4, 8


def regression_step(model: nn.Module, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    y = NOISE * torch.randn(BATCH, generator=g, dtype=torch.float64)  # w* = 0
    return 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()


def test_noise_terms_are_unbiased_on_linear_regression() -> None:
    """Known answer: per-sample gradient ``(w.x - y) x`` at ``w = w* + u``, ``x ~ N(0, I)``:
    ``|G|^2 = |u|^2`` and ``tr(Sigma) = DIM (|u|^2 + noise^2) + |u|^2``. lr 0 keeps w fixed;
    the means over 600 steps lie within 3 standard errors, and the moving average's noise
    scale is near the truth."""
    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(OFFSET)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(3)
    with Monitor(model, opt) as monitor:
        for _ in range(600):
            opt.zero_grad()
            regression_step(model, g).backward()
            opt.step()
    u2 = DIM * OFFSET**2
    truth = {"trace": DIM * (u2 + NOISE**2) + u2, "squared_norm": u2}
    for key, value in truth.items():
        values = torch.tensor([r[key] for r in monitor.rows])
        assert abs(float(values.mean()) - value) < 3 * float(values.std()) / math.sqrt(len(values))
    ratio = sum(r["trace"] for r in monitor.rows) / sum(r["squared_norm"] for r in monitor.rows)
    assert ratio == pytest.approx(truth["trace"] / truth["squared_norm"], rel=0.1)  # what the averages estimate
    terms = [(r["trace"], r["squared_norm"]) for r in monitor.rows]
    assert monitor.rows[-1]["noise_scale_ema"] == pytest.approx(NoiseScaleEMA(0.9).estimate(terms), rel=1e-12)
    assert all(r["samples"] == BATCH for r in monitor.rows)


@pytest.mark.parametrize("statistics", ["norms", "elements"])
@pytest.mark.parametrize("name", ["mlp", "nanogpt", "resnet_groupnorm"])
def test_one_step_equals_the_per_sample_loop(name: str, statistics: str) -> None:
    """One step of a real model pattern (mean loss, the default): the row's terms (and GSNR)
    equal those of the loop's per-sample gradients, in float64."""
    pattern = zoo.ZOO[name]
    model = zoo.build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = pattern.batch(6, 5)
    monitor = Monitor(model, opt, statistics=statistics)
    (pattern.losses(model, batch).sum() / len(batch)).backward()
    opt.step()
    monitor.close()
    moments = reference(model, pattern, [batch], [p for p in model.parameters() if p.requires_grad])
    trace, squared = noise_terms(6, [m for m, _ in moments], [m2 for _, m2 in moments])
    row = monitor.rows[0]
    assert row["trace"] == pytest.approx(float(trace), rel=1e-9)
    assert row["squared_norm"] == pytest.approx(float(squared), rel=1e-9, abs=1e-12 * float(trace))
    if statistics == "elements":
        want = mean_gsnr([Moments(6, m, m2) for m, m2 in moments], "mean").value
        assert row["gsnr_mean"] == pytest.approx(want, rel=1e-9)


def test_training_is_unchanged_and_the_csv_plots(tmp_path: Path) -> None:
    """The same loop with and without a Monitor ends at bitwise the same weights; the CSV has a
    row per step and `gradaccum plot-monitor` draws it."""
    pattern = zoo.ZOO["mlp"]
    weights = []
    for monitored in (False, True):
        model = zoo.build("mlp")
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        monitor = Monitor(model, opt, csv=tmp_path / "run.csv", statistics="elements") if monitored else None
        for k in range(12):
            batch = pattern.batch(8, k)
            opt.zero_grad()
            pattern.losses(model, batch).mean().backward()
            opt.step()
        if monitor is not None:
            monitor.close()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    with open(tmp_path / "run.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {"noise_scale", "noise_scale_ema", "gsnr_sample", "gsnr_mean"} <= set(rows[0])
    assert main(["plot-monitor", str(tmp_path / "run.csv")]) == 0
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_a_step_over_several_forward_passes_is_refused_and_a_bad_csv_is_named(tmp_path: Path, capsys) -> None:
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, opt)
    for k in range(2):  # hand-written accumulation: two backward passes, one step
        pattern.losses(model, pattern.batch(4, k)).mean().backward()
    with pytest.raises(ValueError, match="2 forward passes of the model"):
        opt.step()
    monitor.close()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["plot-monitor", str(bad)]) == 2
    assert "is not a Monitor CSV" in capsys.readouterr().err


def test_tensorboard_scalars_hold_the_rows(tmp_path: Path) -> None:
    """Every finite value of every row is a scalar ``gradaccum/<column>`` at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(OFFSET)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(4)
    with Monitor(model, opt, tensorboard=tmp_path / "tb") as monitor:
        for _ in range(5):
            opt.zero_grad()
            regression_step(model, g).backward()
            opt.step()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for key in ("trace", "noise_scale_ema"):
        scalars = events.Scalars(f"gradaccum/{key}")
        assert [e.step for e in scalars] == [i for i, r in enumerate(monitor.rows) if math.isfinite(r[key])]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in monitor.rows if math.isfinite(r[key])],
                                                           rel=1e-6)
    assert len(events.Scalars("gradaccum/noise_scale_ema")) >= 3


def test_the_adam_preconditioned_noise_scale_equals_the_loop() -> None:
    """``noise_scale_adam`` weights each element by Adam's ``1 / (sqrt(v_hat) + eps)`` from
    the state before the step: NaN at the first step, then the loop's value in float64."""
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)
    monitor = Monitor(model, opt, statistics="elements")
    for k in range(3):
        batch = pattern.batch(6, 40 + k)
        if k == 2:  # the loop's value, from the state before this step
            moments = reference(model, pattern, [batch], params)
            monitor.stats.discard()  # the loop's own forward passes are not the step's
            beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
            weights = [1 / ((opt.state[p]["exp_avg_sq"] / (1 - beta2 ** float(opt.state[p]["step"]))).sqrt() + eps)
                       for p in params]
            trace = sum(float((w * m2).sum()) for w, (_, m2) in zip(weights, moments)) / 5
            signal = sum(float((w * m * m).sum()) for w, (m, _) in zip(weights, moments)) - trace / 6
        opt.zero_grad()
        (pattern.losses(model, batch).sum() / len(batch)).backward()
        opt.step()
    monitor.close()
    assert math.isnan(monitor.rows[0]["noise_scale_adam"])
    assert signal > 0 and monitor.rows[2]["noise_scale_adam"] == pytest.approx(trace / signal, rel=1e-9)
