"""Monitor: the noise scale (and GSNR) of an unchanged training loop, measured only."""

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
from .reference import Tokens
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


def test_plot_monitor_refuses_a_csv_that_is_not_a_monitors(tmp_path: Path, capsys) -> None:
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


# ---------------------------------------------------------------- measured at the end of the backward
def loop_terms(model: nn.Module, pattern: zoo.Pattern, batch) -> tuple[float, float]:
    """The batch's unbiased ``tr(Sigma)`` and ``|G|^2`` from a loop over its samples (each
    sample's summed loss), in float64. Run it with no Monitor attached to the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    moments = reference(model, pattern, [batch], params)
    trace, squared = noise_terms(len(batch), [m for m, _ in moments], [m2 for _, m2 in moments])
    return float(trace), float(squared)


def assert_terms(row: dict[str, float], want: tuple[float, float]) -> None:
    assert row["trace"] == pytest.approx(want[0], rel=1e-9)
    assert row["squared_norm"] == pytest.approx(want[1], rel=1e-9, abs=1e-12 * want[0])


def mean_loss(pattern: zoo.Pattern, model: nn.Module, batch) -> torch.Tensor:
    return pattern.losses(model, batch).sum() / len(batch)


@pytest.mark.parametrize("statistics", ["norms", "elements"])
@pytest.mark.parametrize("name", ["mlp", "nanogpt"])
def test_a_clipped_or_changed_gradient_is_measured_as_the_backward_left_it(name: str, statistics: str) -> None:
    """Clipping (to a norm far below the gradient's), scaling ``.grad`` in place and replacing it
    between the backward and the step: each row is still the loop's terms of its batch."""
    pattern = zoo.ZOO[name]
    model = zoo.build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every batch is measured at the same weights
    batches = [pattern.batch(6, 50 + k) for k in range(3)]
    changes = [lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1e-3),
               lambda ps: [p.grad.mul_(0.25) for p in ps],
               lambda ps: [setattr(p, "grad", 3 * p.grad) for p in ps]]
    with Monitor(model, opt, statistics=statistics) as monitor:
        for batch, change in zip(batches, changes):
            opt.zero_grad()
            mean_loss(pattern, model, batch).backward()
            change([p for p in model.parameters() if p.grad is not None])
            opt.step()
    assert [r["step"] for r in monitor.rows] == [0.0, 1.0, 2.0]
    for row, batch in zip(monitor.rows, batches):
        assert_terms(row, loop_terms(model, pattern, batch))


def test_clipped_training_is_unchanged() -> None:
    """With clipping in the loop, the monitored run ends at bitwise the unmonitored weights."""
    pattern = zoo.ZOO["mlp"]
    weights = []
    for monitored in (False, True):
        model = zoo.build("mlp")
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        monitor = Monitor(model, opt) if monitored else None
        for k in range(6):
            opt.zero_grad()
            mean_loss(pattern, model, pattern.batch(8, k)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
        if monitor is not None:
            monitor.close()
            assert len(monitor.rows) == 6
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_reentrant_checkpointing_is_measured_once_the_whole_backward_has_ended() -> None:
    """Blocks under reentrant activation checkpointing run their own backward inside the
    outer one; the row is taken when the outer one ends (all of .grad), equal to the loop."""
    pattern = zoo.ZOO["nanogpt_modules"]
    torch.manual_seed(0)
    model = zoo.NanoGPT(functional=False, checkpoint=True, layers=2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = pattern.batch(5, 3)
    with Monitor(model, opt) as monitor:
        mean_loss(pattern, model, batch).backward()
        opt.step()
    model.checkpoint = None  # the loop's torch.autograd.grad runs without checkpoints
    assert_terms(monitor.rows[0], loop_terms(model, pattern, batch))


def test_the_terms_are_in_per_sample_mean_units() -> None:
    """A loss averaged over every token (T a sample): the Monitor's terms are those of each
    sample's per-token mean loss, the loop's terms of the summed loss over T^2."""
    pattern = zoo.ZOO["nanogpt"]
    model = zoo.build("nanogpt")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    raw = pattern.batch(6, 7)
    batch = Tokens(raw.tokens, torch.randint(0, 13, raw.labels.shape, generator=torch.Generator().manual_seed(1)))
    tokens = batch.labels.shape[1]
    with Monitor(model, opt) as monitor:
        (pattern.losses(model, batch).sum() / batch.labels.numel()).backward()
        opt.step()
    trace, squared = loop_terms(model, pattern, batch)
    assert_terms(monitor.rows[0], (trace / tokens**2, squared / tokens**2))


def test_a_grad_scaler_is_divided_out_and_its_skipped_step_records_nothing() -> None:
    """A scaled loss with ``scaler=``: the same rows as the unscaled loop (the scale is a power
    of two); an overflowing backward's step is skipped by the scaler and records no row. Without
    ``scaler=`` the terms carry the scale squared (documented), their ratio does not."""
    pattern = zoo.ZOO["mlp"]
    batches = [pattern.batch(6, 60 + k) for k in range(3)]

    def run(scale: float | None, give: bool, overflow: bool = False) -> list[dict[str, float]]:
        model = zoo.build("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        with Monitor(model, opt, scaler=scaler if give else None) as monitor:
            for k, batch in enumerate(batches):
                opt.zero_grad()
                loss = mean_loss(pattern, model, batch) * (math.inf if overflow and k == 1 else 1.0)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                scaler.step(opt)
                scaler.update()
        return monitor.rows

    plain, scaled = run(None, False), run(2.0**12, True)
    for a, b in zip(plain, scaled, strict=True):
        assert b["trace"] == pytest.approx(a["trace"], rel=1e-12)
        assert b["squared_norm"] == pytest.approx(a["squared_norm"], rel=1e-12)
    skipped = run(2.0**12, True, overflow=True)
    assert len(skipped) == 2 and skipped[1]["trace"] == pytest.approx(plain[2]["trace"], rel=1e-12)
    unscaled = run(2.0**12, False)
    assert unscaled[0]["trace"] == pytest.approx(plain[0]["trace"] * 2.0**24, rel=1e-12)
    assert unscaled[0]["noise_scale"] == pytest.approx(plain[0]["noise_scale"], rel=1e-12)


# ---------------------------------------------------------------- refusals
def test_accumulation_in_a_plain_loop_is_refused_at_its_backward_and_the_monitor_goes_on() -> None:
    """A second backward into a .grad not cleared raises (naming accumulation) from that
    backward; after ``zero_grad`` the next step is measured as if nothing had happened."""
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [pattern.batch(4, k) for k in range(3)]
    monitor = Monitor(model, opt)
    mean_loss(pattern, model, batches[0]).backward()
    with pytest.raises(ValueError, match="gradient accumulation.*zero_grad|zero_grad.*gradient accumulation"):
        mean_loss(pattern, model, batches[1]).backward()
    opt.zero_grad()
    mean_loss(pattern, model, batches[2]).backward()
    opt.step()
    monitor.close()
    assert len(monitor.rows) == 1 and monitor.rows[0]["step"] == 0
    assert_terms(monitor.rows[0], loop_terms(model, pattern, batches[2]))


def test_zeroed_gradients_kept_as_tensors_are_not_accumulation() -> None:
    """``zero_grad(set_to_none=False)`` leaves zeros in .grad: a fresh backward, measured."""
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [pattern.batch(5, 20 + k) for k in range(2)]
    with Monitor(model, opt) as monitor:
        for batch in batches:
            opt.zero_grad(set_to_none=False)
            mean_loss(pattern, model, batch).backward()
            opt.step()
    for row, batch in zip(monitor.rows, batches, strict=True):
        assert_terms(row, loop_terms(model, pattern, batch))


def test_a_loss_over_two_forward_passes_is_refused_and_the_monitor_goes_on() -> None:
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = Monitor(model, opt)
    with pytest.raises(ValueError, match="2 forward passes of the model"):
        (mean_loss(pattern, model, pattern.batch(4, 0)) + mean_loss(pattern, model, pattern.batch(4, 1))).backward()
    opt.zero_grad()
    batch = pattern.batch(4, 2)
    mean_loss(pattern, model, batch).backward()
    opt.step()
    monitor.close()
    assert len(monitor.rows) == 1
    assert_terms(monitor.rows[0], loop_terms(model, pattern, batch))


def test_a_step_without_a_backward_of_its_own_records_no_row() -> None:
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt) as monitor:
        mean_loss(pattern, model, pattern.batch(4, 0)).backward()
        opt.step()
        with pytest.warns(RuntimeWarning, match="records no row"):
            opt.step()  # the same gradient again
        opt.zero_grad()
        mean_loss(pattern, model, pattern.batch(4, 1)).backward()
        opt.zero_grad()
        with pytest.warns(RuntimeWarning, match="records no row"):
            opt.step()  # its gradient was cleared: nothing is applied
        opt.zero_grad()
        mean_loss(pattern, model, pattern.batch(4, 2)).backward()
        opt.step()
    assert [r["step"] for r in monitor.rows] == [0.0, 3.0]


def accumulator_run(model: nn.Module, opt: torch.optim.Optimizer, acc, batches) -> None:
    pattern = zoo.ZOO["mlp"]
    for batch in batches:
        acc.backward(pattern.losses(model, batch).mean(), len(batch))


def test_an_optimizer_an_accumulator_steps_is_refused_at_construction() -> None:
    from gradaccum import FixedSteps
    from gradaccum.torch import Accumulator

    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, FixedSteps(2))
    hooks = len(model._forward_hooks)
    with pytest.raises(ValueError, match="stepped by a gradaccum Accumulator"):
        Monitor(model, opt)
    assert len(model._forward_hooks) == hooks and acc.window_micro_batches == 0


@pytest.mark.parametrize("plain_step_first", [False, True])
def test_a_monitor_never_bricks_an_accumulator_on_its_optimizer(plain_step_first: bool) -> None:
    """A Monitor built before the Accumulator refuses from the Accumulator's backward, where a
    failed call changes nothing: at its first backward, or (the Accumulator built after a
    monitored step of a plain loop) after the Accumulator's first window, which steps unrecorded.
    The window is as it was, and once the Monitor is closed the run ends at bitwise the weights
    of the same run without a Monitor."""
    from gradaccum import FixedSteps
    from gradaccum.torch import Accumulator

    pattern = zoo.ZOO["mlp"]
    batches = [pattern.batch(4, 30 + k) for k in range(4)]
    weights = []
    for monitored in (False, True):
        model = zoo.build("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = Monitor(model, opt) if monitored else None
        if plain_step_first:
            mean_loss(pattern, model, pattern.batch(4, 99)).backward()
            opt.step()
            opt.zero_grad()
        acc = Accumulator(model, opt, FixedSteps(2))
        done = 0
        if monitor is not None:
            if plain_step_first:  # the Monitor sees the window's step inside the Accumulator
                accumulator_run(model, opt, acc, batches[:2])
                done = 2
                assert acc.steps == 1 and len(monitor.rows) == 1
            with pytest.raises(ValueError, match="stepped by a gradaccum Accumulator"):
                accumulator_run(model, opt, acc, batches[done:done + 1])
            assert acc.window_micro_batches == 0 and all(p.grad is None for p in model.parameters())
            monitor.close()
        accumulator_run(model, opt, acc, batches[done:])
        assert acc.steps == 2
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


# ---------------------------------------------------------------- rows and the CSV
def test_a_non_finite_term_stays_out_of_the_moving_averages() -> None:
    """NaN or infinite terms keep their own values in their row (``noise_scale`` NaN) and the
    average goes on from the finite rows only."""
    from gradaccum import MonitorLog

    terms = [(4.0, 1.0), (math.nan, 1.0), (5.0, math.inf), (math.inf, 2.0), (3.0, math.nan), (6.0, 0.5)]
    log = MonitorLog()
    rows = [log.record(8, t, g) for t, g in terms]
    finite = [(t, g) for t, g in terms if math.isfinite(t) and math.isfinite(g)]
    assert rows[-1]["noise_scale_ema"] == pytest.approx(NoiseScaleEMA(0.9).estimate(finite), rel=1e-12)
    for row, (t, g) in zip(rows, terms):
        assert (row["trace"], row["squared_norm"]) == pytest.approx((t, g), nan_ok=True)
        if not (math.isfinite(t) and math.isfinite(g)):
            assert math.isnan(row["noise_scale"])
    assert rows[2]["noise_scale_ema"] == pytest.approx(4.0, rel=1e-12)


def test_a_column_first_seen_in_a_later_row_widens_the_csv(tmp_path: Path) -> None:
    from gradaccum import MonitorLog

    log = MonitorLog(tmp_path / "log.csv")
    log.record(1, math.nan, math.nan)
    log.record(8, 2.0, 1.0, **{"noise_scale/head": 3.0})
    log.record(8, 2.0, 1.0)
    log.close()
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["noise_scale/head"] for r in rows] == ["nan", "3.0", "nan"]
    assert [float(r["samples"]) for r in rows] == [1.0, 8.0, 8.0]
    assert list(tmp_path.iterdir()) == [tmp_path / "log.csv"]  # no temporary file left


def test_a_first_batch_of_one_sample_then_sixteen_writes_every_column(tmp_path: Path) -> None:
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt, csv=tmp_path / "run.csv") as monitor:
        for k, size in enumerate((1, 16)):
            opt.zero_grad()
            mean_loss(pattern, model, pattern.batch(size, k)).backward()
            opt.step()
    with open(tmp_path / "run.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    layers = [k for k in monitor.rows[1] if k.startswith("noise_scale/")]
    assert len(rows) == 2 and layers and all(rows[0][k] == "nan" for k in layers)
    assert all(float(rows[1][k]) == pytest.approx(monitor.rows[1][k], rel=1e-12) for k in layers)


@pytest.mark.parametrize("where", ["", "dir", "missing/run.csv"])
def test_a_csv_path_that_is_not_a_writable_file_is_refused_naming_csv(tmp_path: Path, where: str) -> None:
    """Refused at construction, before any hook or file: the message names ``csv``."""
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    (tmp_path / "dir").mkdir()
    path = "" if where == "" else tmp_path / where
    with pytest.raises(ValueError, match=r"^csv"):
        Monitor(model, opt, csv=path)
    assert not model._forward_hooks and sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_a_backward_that_raised_half_way_leaves_nothing_behind() -> None:
    """A backward that raises after part of it ran (a hook failing inside the model): the
    next step is measured alone, not refused as a second forward pass."""
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def fail(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        raise RuntimeError("a hook failed")

    with Monitor(model, opt) as monitor:
        handle = model[2].register_full_backward_hook(fail)
        with pytest.raises(RuntimeError, match="a hook failed"):
            mean_loss(pattern, model, pattern.batch(4, 0)).backward()
        handle.remove()
        opt.zero_grad()
        batch = pattern.batch(4, 1)
        mean_loss(pattern, model, batch).backward()
        opt.step()
    assert len(monitor.rows) == 1
    assert_terms(monitor.rows[0], loop_terms(model, pattern, batch))


def test_a_row_the_disk_refuses_is_cut_and_not_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk half-way through a row: the file keeps whole rows only, the log records
    nothing (rows and averages as they were), and the next row goes on."""
    from gradaccum import MonitorLog
    from gradaccum._core import monitor_log

    full = [False]

    class Disk:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, text: str) -> int:
            if full[0]:
                self.f.write(text[:5])
                raise OSError(28, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name: str):
            return getattr(self.f, name)

    monkeypatch.setattr(monitor_log, "open", lambda *args, **kwargs: Disk(open(*args, **kwargs)), raising=False)
    log = MonitorLog(tmp_path / "log.csv")
    log.record(8, 2.0, 1.0)
    full[0] = True
    with pytest.raises(OSError, match="No space"):
        log.record(8, 4.0, 1.0)
    full[0] = False
    assert len(log.rows) == 1
    log.record(8, 6.0, 1.0)
    log.close()
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["trace"]) for r in rows] == [2.0, 6.0]
    assert float(rows[1]["noise_scale_ema"]) == pytest.approx(NoiseScaleEMA(0.9).estimate([(2.0, 1.0), (6.0, 1.0)]),
                                                              rel=1e-12)
