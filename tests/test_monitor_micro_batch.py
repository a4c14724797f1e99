"""Monitor(source="micro_batch") on hand-written accumulation loops: several ``loss.backward()``
then ``optimizer.step()``. Each row's terms equal a float64 loop over the micro-batches' own
gradients (each micro-batch's gradient from its own ``torch.autograd.grad``), whatever the loop
does to ``.grad`` before the step (clipping, a GradScaler's unscale), with a wrapped optimizer,
and on nanoGPT's model with dropout, compiled or not."""

from __future__ import annotations

import copy
import gc
import itertools
import math

import pytest
import torch
from torch import nn

from gradaccum._core.noise_scale import pooled_terms
from gradaccum.torch import Monitor
from gradaccum.torch._monitor_window import micro_batch_norm_sums

from .real_models import GPTConfig, TinyGPT


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batch(b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def flat_grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def loop_terms(sums: list[torch.Tensor], sizes: list[int], weighted: bool = True) -> tuple[float, float]:
    """The window's ``tr(Sigma)`` and ``|G|^2`` from each micro-batch's gradient sum ``S_j``, in
    float64. ``weighted``: the micro-batch estimator, ``sum_j b_j |g_j - g|^2 / (k - 1)`` around
    the sample-weighted mean ``g = sum_j S_j / n``; else the pairwise form over the means
    ``g_j = S_j / b_j`` (``|G|^2`` the mean of ``g_j . g_l`` over pairs)."""
    k, n = len(sums), sum(sizes)
    means = [s / b for s, b in zip(sums, sizes)]
    if weighted:
        mean = sum(sums) / n
        trace = sum(b * float((m - mean) @ (m - mean)) for m, b in zip(means, sizes)) / (k - 1)
        return trace, float(mean @ mean) - trace / n
    pairs = list(itertools.combinations(range(k), 2))
    signal = sum(float(means[j] @ means[m]) for j, m in pairs) / len(pairs)
    trace = (sum(float(m @ m) for m in means) - k * signal) / sum(1.0 / b for b in sizes)
    return trace, signal


def assert_row(row: dict[str, float], want: tuple[float, float], n: int) -> None:
    assert row["samples"] == n
    assert row["trace"] == pytest.approx(want[0], rel=1e-9)
    assert row["squared_norm"] == pytest.approx(want[1], rel=1e-8, abs=1e-12 * want[0])


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction=reduction)


@pytest.mark.parametrize(("reduction", "accumulation", "sizes"), [
    ("mean", "mean", [4, 4, 4]),
    ("mean", 3, [4, 4, 4]),
    ("sum", "sum", [3, 6, 1]),
    ("sum", "mean", [3, 6, 1]),
    ("mean", "mean", [3, 6, 1]),  # unequal means: the pairwise form
], ids=["mean", "fixed_divisor", "sum_uneven", "sum_divided_uneven", "mean_uneven"])
def test_each_window_equals_a_float64_loop_over_its_micro_batches(reduction: str, accumulation, sizes) -> None:
    """Three windows of three micro-batches, with the loss of each scaled as the loop says;
    the model's terms and each layer's noise scale equal the loop's."""
    model = mlp()
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    divisor = len(sizes) if accumulation == "mean" else 1 if accumulation == "sum" else accumulation
    with Monitor(model, opt, source="micro_batch", reduction=reduction, accumulation=accumulation) as monitor:
        for w in range(3):
            for j, b in enumerate(sizes):
                (ce(model, *batch(b, 10 * w + j), reduction=reduction) / divisor).backward()
            opt.step()
            opt.zero_grad()
    assert len(monitor.rows) == 3
    layers = {"0": params[:2], "2": params[2:]}
    for w, row in enumerate(monitor.rows):
        parts = [(ce(reference, *batch(b, 10 * w + j), reduction="sum"), b) for j, b in enumerate(sizes)]
        weighted = reduction == "sum" or len(set(sizes)) == 1
        assert_row(row, loop_terms([flat_grad(loss, params) for loss, _ in parts], sizes, weighted), sum(sizes))
        for name, group in layers.items():
            trace, squared = loop_terms([flat_grad(loss, group) for loss, _ in parts], sizes, weighted)
            assert row[f"noise_scale/{name}"] == pytest.approx(trace / squared if squared > 0 else math.inf, rel=1e-8)


def test_clipping_and_the_step_leave_the_measurement_alone() -> None:
    """Clipped hard before an Adam step: the rows are the loop's terms at each window's weights,
    and the monitored run ends at bitwise the unmonitored weights."""
    weights, rows, want = [], None, []
    for monitored in (False, True):
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        monitor = Monitor(model, opt, source="micro_batch") if monitored else None
        for w in range(4):
            if monitored:
                params = list(model.parameters())
                want.append(loop_terms([flat_grad(ce(model, *batch(4, 10 * w + j), reduction="sum"), params)
                                        for j in range(2)], [4, 4]))
            for j in range(2):
                (ce(model, *batch(4, 10 * w + j)) / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
            opt.zero_grad()
        if monitor is not None:
            monitor.close()
            rows = monitor.rows
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert rows is not None and len(rows) == 4
    for row, terms in zip(rows, want):
        assert_row(row, terms, 8)


def test_a_grad_scaler_is_divided_out_and_an_overflowing_window_records_nothing() -> None:
    """The scaled loop's rows equal the unscaled loop's; a window with an overflowing micro-batch
    is skipped by the scaler and records no row, and the window after it is measured alone."""
    def run(scale: float | None, overflow: bool = False) -> list[dict[str, float]]:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        with Monitor(model, opt, source="micro_batch", scaler=scaler) as monitor:
            for w in range(3):
                for j in range(3):
                    loss = ce(model, *batch(4, 10 * w + j)) / 3
                    scaler.scale(loss * (math.inf if overflow and (w, j) == (1, 1) else 1.0)).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        return monitor.rows

    plain, scaled = run(None), run(2.0**12)
    assert len(plain) == 3
    for a, b in zip(plain, scaled, strict=True):
        assert b["trace"] == pytest.approx(a["trace"], rel=1e-12)
        assert b["squared_norm"] == pytest.approx(a["squared_norm"], rel=1e-10)
    skipped = run(2.0**12, overflow=True)
    assert [r["step"] for r in skipped] == [0.0, 1.0]  # the skipped step never reached the optimizer
    assert skipped[1]["trace"] == pytest.approx(plain[2]["trace"], rel=1e-12)
    assert skipped[1]["samples"] == 12


def test_accelerate_accumulation_with_its_wrapped_optimizer() -> None:
    """Accelerate's own accumulation (``gradient_accumulation_steps=2``: ``accelerator.backward``
    divides each loss by 2, the AcceleratedOptimizer steps every second call): the Monitor on
    the wrapped optimizer records one row per window, the loop's terms."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = mlp()
        reference = copy.deepcopy(model)
        model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        with Monitor(model, opt, source="micro_batch", accumulation=2) as monitor:
            for k in range(6):
                with accelerator.accumulate(model):
                    accelerator.backward(ce(model, *batch(4, k)))
                    if accelerator.sync_gradients:  # as Accelerate's docs clip: once per window
                        accelerator.clip_grad_norm_(model.parameters(), 1e-3)
                    opt.step()
                    opt.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert len(monitor.rows) == 3
    params = list(reference.parameters())
    for w, row in enumerate(monitor.rows):
        sums = [flat_grad(ce(reference, *batch(4, 2 * w + j), reduction="sum"), params) for j in range(2)]
        assert_row(row, loop_terms(sums, [4, 4]), 8)


def test_lightning_accumulate_grad_batches_steps_through_its_closure() -> None:
    """Lightning's automatic optimization with ``accumulate_grad_batches=3``: the window's last
    backward runs inside ``optimizer.step(closure)`` of the LightningOptimizer; each row equals
    the loop's terms of its three batches."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    net = mlp()
    reference = copy.deepcopy(net)
    parts = [batch(4, 40 + k) for k in range(6)]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.monitor: Monitor | None = None

        def on_train_start(self) -> None:
            self.monitor = Monitor(self.net, self.optimizers(), source="micro_batch", accumulation=3)

        def on_train_end(self) -> None:
            self.monitor.close()

        def training_step(self, data, index):
            return ce(self.net, *data)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = Module()
    data = TensorDataset(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=3, gradient_clip_val=1e-3,
              logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, DataLoader(data, batch_size=4))
    rows = module.monitor.rows
    assert len(rows) == 2
    params = list(reference.parameters())
    for w, row in enumerate(rows):
        sums = [flat_grad(ce(reference, *parts[3 * w + j], reduction="sum"), params) for j in range(3)]
        assert_row(row, loop_terms(sums, [4, 4, 4]), 12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own import
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_nanogpt_with_dropout_compiled_or_not(compiled: bool) -> None:
    """nanoGPT's model as written (its own token-mean loss, the tied head, dropout 0.2 active)
    in nanoGPT's loop (``loss / gradient_accumulation_steps``), compiled or not: each row equals
    the loop over the micro-batches' gradients with the same dropout masks (the seed replayed),
    in the units of one sequence's share of the mean loss."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(dropout=0.2)).double()
    run = torch.compile(model, backend="eager") if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    steps, sizes = 2, [3, 3]
    g = torch.Generator().manual_seed(1)
    data = [[(torch.randint(0, 32, (b, 8), generator=g), torch.randint(0, 32, (b, 8), generator=g)) for b in sizes]
            for _ in range(steps)]
    with Monitor(model, opt, source="micro_batch") as monitor:
        for w in range(steps):
            for j, (x, y) in enumerate(data[w]):
                torch.manual_seed(100 * w + j)
                _, loss = run(x, y)
                (loss / len(sizes)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert len(monitor.rows) == steps
    params = list(model.parameters())
    for w, row in enumerate(monitor.rows):
        sums = []
        for j, (x, y) in enumerate(data[w]):
            torch.manual_seed(100 * w + j)
            sums.append(flat_grad(model(x, y)[1] * len(x), params))
        assert_row(row, loop_terms(sums, sizes), sum(sizes))


class TwoHeads(nn.Module):
    """A trunk and two heads; the second head only where the forward is asked to use it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.a, self.b = nn.Linear(5, 6).double(), nn.Linear(6, 3).double(), nn.Linear(6, 3).double()

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return self.a(h) + self.b(h) if use_b else self.a(h)


@pytest.mark.parametrize("uses_b", [0, 2], ids=["first_micro_batch_only", "last_only"])
def test_a_parameter_only_some_micro_batches_reach_is_measured_with_zeros_elsewhere(uses_b: int) -> None:
    """A head that one micro-batch's loss uses and the others' do not: its gradient is zero
    there, as in the float64 loop, whether its only gradient came first (``.grad`` was empty:
    the window's sum is the added gradient itself) or last."""
    model = TwoHeads()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)

    def loss(j: int) -> torch.Tensor:
        x, y = batch(4, j)
        return nn.functional.cross_entropy(model(x, j == uses_b), y, reduction="sum")

    with Monitor(model, opt, source="micro_batch", reduction="sum", accumulation="sum") as monitor:
        for j in range(3):
            loss(j).backward()
        opt.step()
    sums = [torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                       for p, g in zip(params, torch.autograd.grad(loss(j), params, allow_unused=True))])
            for j in range(3)]
    (row,) = monitor.rows
    assert_row(row, loop_terms(sums, [4, 4, 4]), 12)


def test_unbiased_on_linear_regression() -> None:
    """Known answer (``|G|^2 = |u|^2``, ``tr(Sigma) = d (|u|^2 + noise^2) + |u|^2`` at
    ``w = w* + u``): over 400 windows of two micro-batches the means lie within 3 standard
    errors of the truth."""
    dim, noise, offset = 6, 0.5, 0.4
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(offset)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(3)
    with Monitor(model, opt, source="micro_batch") as monitor:
        for _ in range(400):
            for _ in range(2):
                x = torch.randn(4, dim, generator=g, dtype=torch.float64)
                y = noise * torch.randn(4, generator=g, dtype=torch.float64)
                (0.5 * ((model(x).squeeze(1) - y) ** 2).mean() / 2).backward()
            opt.step()
            opt.zero_grad()
    u2 = dim * offset**2
    for key, truth in (("trace", dim * (u2 + noise**2) + u2), ("squared_norm", u2)):
        values = torch.tensor([r[key] for r in monitor.rows])
        assert abs(float(values.mean()) - truth) < 3 * float(values.std()) / math.sqrt(len(values))


# ---------------------------------------------------------------- refusals
def test_a_loop_with_one_backward_per_step_is_refused_before_its_first_step() -> None:
    """One backward per step has no between-micro-batch variance: the first step raises before
    the optimizer runs (the weights are unchanged), naming both ways out."""
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with Monitor(model, opt, source="micro_batch") as monitor:
        ce(model, *batch(4, 0)).backward()
        with pytest.raises(ValueError, match="source='per_sample'.*accumulate >= 2 micro-batches"):
            opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert monitor.rows == []


def test_a_short_last_window_of_one_micro_batch_records_nan_terms() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt, source="micro_batch") as monitor:
        for sizes in ([4, 4], [4]):
            for j, b in enumerate(sizes):
                (ce(model, *batch(b, j)) / len(sizes)).backward()
            opt.step()
            opt.zero_grad()
    assert len(monitor.rows) == 2 and math.isfinite(monitor.rows[0]["trace"])
    assert monitor.rows[1]["samples"] == 4 and math.isnan(monitor.rows[1]["trace"])


def test_gradients_not_cleared_after_a_step_are_refused_and_the_monitor_goes_on() -> None:
    """A backward into the last window's .grad (no zero_grad after the step) raises from that
    backward; after zero_grad the next window is measured as the loop's."""
    model = mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt, source="micro_batch") as monitor:
        for j in range(2):
            (ce(model, *batch(4, j)) / 2).backward()
        opt.step()
        with pytest.raises(ValueError, match="zero_grad"):
            ce(model, *batch(4, 5)).backward()
        opt.zero_grad()
        for j in range(2):
            (ce(model, *batch(4, 10 + j)) / 2).backward()
        opt.step()
    assert len(monitor.rows) == 2
    params = list(reference.parameters())
    sums = [flat_grad(ce(reference, *batch(4, 10 + j), reduction="sum"), params) for j in range(2)]
    assert_row(monitor.rows[1], loop_terms(sums, [4, 4]), 8)


@pytest.mark.parametrize("changed_after", [0, 1])
def test_a_window_with_refused_backwards_records_no_row(changed_after: int) -> None:
    """A loop that catches the refusals of a window's later backwards (``.grad`` changed between
    them, as DDP's all-reduce does outside ``no_sync()``) steps micro-batches the Monitor did not
    measure: the step records no row and warns how many backwards were refused, whether one or
    two of the window's were measured; the next window is measured."""
    model = mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt, source="micro_batch", accumulation=3) as monitor:
        for j in range(3):
            try:
                (ce(model, *batch(4, j)) / 3).backward()
            except ValueError as error:
                assert "no_sync()" in str(error)
            if j == changed_after:
                with torch.no_grad():
                    model[0].weight.grad.add_(1.0)
        with pytest.warns(RuntimeWarning, match=f"{2 - changed_after} of this window's backwards were refused"):
            opt.step()
        opt.zero_grad()
        for j in range(3):
            (ce(model, *batch(4, 10 + j)) / 3).backward()
        opt.step()
    assert len(monitor.rows) == 1
    params = list(reference.parameters())
    sums = [flat_grad(ce(reference, *batch(4, 10 + j), reduction="sum"), params) for j in range(3)]
    assert_row(monitor.rows[0], loop_terms(sums, [4, 4, 4]), 12)


def test_what_the_micro_batch_source_cannot_measure_is_refused_by_name() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="statistics='elements' with source='micro_batch'"):
        Monitor(model, opt, source="micro_batch", statistics="elements")
    with pytest.raises(ValueError, match="source"):
        Monitor(model, opt, source="hooks")
    for bad in (0, 2.5, True, "mean_of_means"):
        with pytest.raises((ValueError, TypeError), match="accumulation"):
            Monitor(model, opt, source="micro_batch", accumulation=bad)
    with Monitor(model, opt, source="micro_batch"):
        x, y = batch(4, 0)
        with pytest.raises(ValueError, match="2 forward passes"):
            (ce(model, x, y) + ce(model, x, y)).backward()


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_a_float32_or_bfloat16_model_measures_what_a_float64_loop_of_its_gradients_gives(dtype: torch.dtype,
                                                                                         rel: float) -> None:
    """The squared norms and products of a float32 model's gradients (one dot each) and of a
    bfloat16 model's (summed in float32), against float64 over the very gradients it added."""
    model = mlp().to(dtype)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    sizes = [4, 4, 4]
    added: list[torch.Tensor] = []
    with Monitor(model, opt, source="micro_batch", reduction="sum", accumulation="sum") as monitor:
        for j, b in enumerate(sizes):
            x, y = batch(b, j)
            before = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
            ce(model, x.to(dtype), y, reduction="sum").backward()
            added.append(torch.cat([(p.grad - g).double().reshape(-1) for p, g in zip(params, before)]))
        opt.step()
    (row,) = monitor.rows
    trace, squared = loop_terms(added, sizes)
    assert row["trace"] == pytest.approx(trace, rel=rel)
    assert row["squared_norm"] == pytest.approx(squared, rel=rel, abs=rel * trace)


def test_complex_parameters_and_sparse_gradients_are_refused_by_name() -> None:
    complex_model = nn.Sequential(nn.Linear(3, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"parameter 0\.weight is complex"):
        Monitor(complex_model, torch.optim.SGD(complex_model.parameters(), lr=0.1), source="micro_batch")
    sparse_model = nn.Sequential(nn.Embedding(10, 3, sparse=True))
    with pytest.raises(ValueError, match=r"0 makes sparse gradients"):
        Monitor(sparse_model, torch.optim.SGD(sparse_model.parameters(), lr=0.1), source="micro_batch")
    for model in (complex_model, sparse_model):  # nothing was left behind: a plain backward runs as before
        assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_are_summed_in_float32(dtype: torch.dtype) -> None:
    """Each added gradient's squared norm and its product with ``.grad`` before the add, of a
    half-precision model, equal float64 over the very tensors the backward added and held (a
    product summed in half precision keeps 3 digits)."""
    model = mlp(seed=3).to(dtype)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    squares: list[float] = []
    dots: list[float] = []

    def capture(p: nn.Parameter):
        def hook(added: torch.Tensor) -> None:
            squares[-1] += float(added.double().square().sum())
            if p.grad is not None:
                dots[-1] += float((added.double() * p.grad.double()).sum())
        return hook

    for p in params:
        p.register_hook(capture(p))  # before the Monitor's: sees the same tensors first
    sizes = [8, 8, 8]
    with Monitor(model, opt, source="micro_batch", reduction="sum", accumulation="sum") as monitor:
        for j, b in enumerate(sizes):
            squares.append(0.0)
            dots.append(0.0)
            x, y = batch(b, 20 + j)
            ce(model, x.to(dtype), y, reduction="sum").backward()
        opt.step()
    (row,) = monitor.rows
    want = pooled_terms(micro_batch_norm_sums(sizes, [1] * 3, squares, dots))
    assert row["trace"] == pytest.approx(want.trace, rel=1e-6)
    assert row["squared_norm"] == pytest.approx(want.squared_norm, rel=1e-6, abs=1e-6 * want.trace)


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")
def test_a_backward_with_create_graph_measures_what_a_plain_one_does() -> None:
    """``backward(create_graph=True)`` hands the hooks gradients that require grad: the rows are
    the plain backward's."""
    rows, held = [], []
    for create_graph in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Monitor(model, opt, source="micro_batch") as monitor:
            for w in range(2):
                for j in range(3):
                    (ce(model, *batch(4, 10 * w + j)) / 3).backward(create_graph=create_graph)
                    if create_graph:
                        values = monitor._window._unread[-1][2]  # type: ignore[union-attr]
                        held.append(values is not None and values.requires_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
        rows.append(monitor.rows)
    assert len(rows[0]) == 2 and held == [False] * 6  # nothing the window holds keeps the double-backward graph
    for plain, graphed in zip(*rows):
        assert graphed["trace"] == pytest.approx(plain["trace"], rel=1e-12)
        assert graphed["squared_norm"] == pytest.approx(plain["squared_norm"], rel=1e-12, abs=1e-14)


def test_the_window_is_read_from_the_device_once_at_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """No host read per backward (on a GPU each would wait for the backward to finish): the
    window's squares and products are read in one ``tolist`` at the step."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reads: list[str] = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    with Monitor(model, opt, source="micro_batch") as monitor:
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or tolist(self))
        monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append("item") or item(self))
        for w in range(2):
            for j in range(3):
                (ce(model, *batch(4, 10 * w + j)) / 3).backward()
            assert reads == [] if w == 0 else reads == ["tolist"]
            opt.step()
            assert reads == ["tolist"] * (w + 1)
            opt.zero_grad()
    assert len(monitor.rows) == 2


def test_a_refusal_leaves_no_reference_cycle() -> None:
    """The error a backward raises is freed with the caller's last reference to it: the error,
    the Monitor's frames and the backward's tensors are not left for the garbage collector."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt, source="micro_batch") as monitor:
        ce(model, *batch(4, 0)).backward()
        with torch.no_grad():
            model[0].weight.grad.add_(1.0)
        gc.collect()
        gc.disable()
        try:
            try:
                ce(model, *batch(4, 1)).backward()
            except ValueError as error:
                assert "cannot be told apart" in str(error)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, BaseException)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []
    assert monitor.rows == []
