"""Lightning: a module with the Accumulating mixin trains under Trainer(...) with a rule or a
planner; windows equal the full-batch step in float64, each epoch's partial window is applied (or,
with windows_span_epochs, the fit's last one), the scheduler and global_step count every optimizer
step, the records reach the logs, and a checkpoint keeps the partial window."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradaccum import BatchRamp, FixedSteps, NoiseScalePlanner
from gradaccum.integrations.lightning import Accumulating

from .test_micro_batch import micro_batch_terms


def data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


class Classifier(Accumulating, L.LightningModule):
    def __init__(self, rule, span: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.windows_span_epochs = span
        self.net = net()
        self.rule = rule
        self.optimizer_steps = 0  # counted by the torch optimizer itself, apart from Lightning

    def configure_accumulation(self):
        return self.rule

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.05)
        optimizer.register_step_post_hook(lambda *_: setattr(self, "optimizer_steps", self.optimizer_steps + 1))
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.accumulate(loss, len(y))


def trainer(**kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


class Captured(Logger):
    """Keeps what reaches a logger: (step, metrics) per call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "captured"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def last(self, key: str) -> float | None:
        """The last value logged under ``key`` (Lightning repeats a step metric at the next steps)."""
        values = [m[key] for _, m in self.rows if key in m]
        return values[-1] if values else None


class StopAfter(L.Callback):
    """Sets ``trainer.should_stop`` after batch ``batch_idx`` of the first epoch (as a Timer would)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            trainer.should_stop = True


class SaveOnException(L.Callback):
    """Saves a checkpoint when the fit raises, as ``OnExceptionCheckpoint`` does."""

    def __init__(self, path) -> None:
        self.path = path

    def on_exception(self, trainer, module, exception) -> None:
        trainer.save_checkpoint(self.path)


class SaveAfterFirstEpoch(L.Callback):
    """Saves a checkpoint at the end of the first epoch, where Lightning's callbacks save theirs."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def uneven(n_windows: int) -> list[list[int]]:
    """Micro-batches of 5, 3 and 4 samples: windows of 12."""
    out = []
    for w in range(n_windows):
        out += [list(range(12 * w + a, 12 * w + b)) for a, b in ((0, 5), (5, 8), (8, 12))]
    return out


def full_batch_steps(net: nn.Module, dataset: TensorDataset, windows: list) -> nn.Module:
    """A copy of ``net`` after one AdamW step (and scheduler step) per window of sample indices."""
    reference = copy.deepcopy(net)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for window in windows:
        x, y = dataset[window]
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
        scheduler.step()
    return reference


def test_windows_through_the_trainer_equal_the_full_batch_steps_in_float64() -> None:
    dataset = data(36)
    module = Classifier(FixedSteps(3))
    initial = copy.deepcopy(module.net)
    fit = trainer(max_epochs=1)
    fit.fit(module, DataLoader(dataset, batch_sampler=uneven(3)))
    assert_weights(module, full_batch_steps(initial, dataset, [slice(12 * w, 12 * (w + 1)) for w in range(3)]))
    assert fit.global_step == 3 and module.lr_schedulers().last_epoch == 3
    assert fit.logged_metrics["gradaccum/items"] == 12 and fit.logged_metrics["gradaccum/micro_batches"] == 3


def test_a_planner_changes_the_windows_and_global_step_counts_them() -> None:
    module = Classifier(BatchRamp(8, 32, over=96, micro_batch=8))
    fit = trainer(max_epochs=1)
    fit.fit(module, DataLoader(data(160), batch_size=8))
    sizes = [r.items for r in module.accumulator.history]
    assert sizes[0] == 8 and max(sizes) == 32
    assert fit.global_step == len(sizes) and module.lr_schedulers().last_epoch == len(sizes)


def test_a_noise_scale_planner_on_the_micro_batch_source_measures_the_micro_batches() -> None:
    """NoiseScalePlanner(source="micro_batch") in the mixin: the first window's terms equal a
    float64 loop over its two micro-batches' gradients, every planned window has two or more
    micro-batches and finite terms, each plan is the planner's own, and the noise scale is logged."""
    dataset = data(96)
    planner = NoiseScalePlanner(1.0, min_batch=8, max_batch=32, micro_batch=4, source="micro_batch")
    module = Classifier(planner)
    initial = copy.deepcopy(module.net)
    fit = trainer(max_epochs=1)
    fit.fit(module, DataLoader(dataset, batch_size=4))
    history = module.accumulator.history
    x, y = dataset[0:8]
    trace, squared, n = micro_batch_terms(initial, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert history[0].micro_batches == 2 and history[0].info["samples"] == n
    assert history[0].info["trace"] == pytest.approx(trace, rel=1e-10)
    assert history[0].info["squared_norm"] == pytest.approx(squared, rel=1e-9, abs=1e-12 * trace)
    planned = [r for r in history if r.reason == "rule"]
    assert len(planned) >= 3 and all(r.micro_batches >= 2 and math.isfinite(r.info["trace"]) for r in planned)
    for w in range(1, len(planned)):
        assert history[w].micro_batches == planner.plan(history[:w])
    assert "gradaccum/noise_scale" in fit.logged_metrics


def epoch_of_uneven_micro_batches() -> list[list[int]]:
    """One epoch of micro-batches of 5, 3, 4 and 5 samples: with windows of 3 micro-batches, a
    full window of 12 samples and the epoch's partial window of 5."""
    return [list(range(0, 5)), list(range(5, 8)), list(range(8, 12)), list(range(12, 17))]


def assert_weights(module: Classifier, reference: nn.Module) -> None:
    for ours, theirs in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-14)


def test_each_epoch_applies_its_partial_window_and_equals_the_full_batch_steps_in_float64() -> None:
    """As with accumulate_grad_batches, a window ends with its epoch: the short last window of
    every epoch is applied (averaged over its own items) and counted in global_step."""
    dataset = data(17)
    module = Classifier(FixedSteps(3))
    initial = copy.deepcopy(module.net)
    fit = trainer(max_epochs=2)
    fit.fit(module, DataLoader(dataset, batch_sampler=epoch_of_uneven_micro_batches()))
    assert_weights(module, full_batch_steps(initial, dataset, [slice(0, 12), slice(12, 17)] * 2))
    assert [(r.micro_batches, r.reason) for r in module.accumulator.history] == [(3, "rule"), (1, "flush")] * 2
    assert module.accumulator.window_micro_batches == 0
    assert fit.global_step == module.optimizer_steps == 4 and module.lr_schedulers().last_epoch == 4
    assert fit.logged_metrics["gradaccum/items"] == 5 and fit.logged_metrics["gradaccum/micro_batches"] == 1


def test_max_steps_counts_the_epoch_end_window() -> None:
    """The epoch's partial window is an optimizer step like the others: max_steps=2 ends the fit
    after the first epoch's full and partial windows."""
    dataset = data(32)
    module = Classifier(FixedSteps(3))
    initial = copy.deepcopy(module.net)
    fit = trainer(max_epochs=5, max_steps=2)
    fit.fit(module, DataLoader(dataset, batch_size=8))
    assert [r.micro_batches for r in module.accumulator.history] == [3, 1]
    assert fit.global_step == module.optimizer_steps == 2 and fit.current_epoch == 1
    assert_weights(module, full_batch_steps(initial, dataset, [slice(0, 24), slice(24, 32)]))


@pytest.mark.parametrize("span", [False, True], ids=["epoch_windows", "windows_span_epochs"])
def test_a_fit_stopped_mid_window_applies_the_open_window(span: bool) -> None:
    """trainer.should_stop after 2 of a window's 3 micro-batches (a Timer, early stopping): the
    open window is applied (in on_train_epoch_end, or at the end of the fit when windows span
    epochs), counted in global_step and logged, never dropped."""
    dataset = data(32)
    module = Classifier(FixedSteps(3), span=span)
    initial = copy.deepcopy(module.net)
    logger = Captured()
    fit = trainer(max_epochs=3, logger=logger, log_every_n_steps=1, callbacks=[StopAfter(1)])
    fit.fit(module, DataLoader(dataset, batch_size=8))
    assert [(r.micro_batches, r.reason) for r in module.accumulator.history] == [(2, "flush")]
    assert fit.global_step == module.optimizer_steps == 1 and module.lr_schedulers().last_epoch == 1
    assert logger.last("gradaccum/micro_batches") == 2
    assert_weights(module, full_batch_steps(initial, dataset, [slice(0, 16)]))


def test_windows_that_span_epochs_apply_the_last_open_window_when_the_fit_ends() -> None:
    """windows_span_epochs=True: 4 micro-batches per epoch in windows of 3 run on across the epoch
    boundary; the fit's last 2 micro-batches are applied as a partial window, counted and logged."""
    dataset = data(32)
    module = Classifier(FixedSteps(3), span=True)
    initial = copy.deepcopy(module.net)
    logger = Captured()
    fit = trainer(max_epochs=2, logger=logger, log_every_n_steps=1)
    fit.fit(module, DataLoader(dataset, batch_size=8))
    assert [(r.micro_batches, r.reason) for r in module.accumulator.history] == [(3, "rule"), (3, "rule"), (2, "flush")]
    assert fit.global_step == module.optimizer_steps == 3 and module.lr_schedulers().last_epoch == 3
    assert logger.last("gradaccum/micro_batches") == 2 and logger.last("gradaccum/items") == 16
    windows = [list(range(0, 24)), list(range(24, 32)) + list(range(0, 16)), list(range(16, 32))]
    assert_weights(module, full_batch_steps(initial, dataset, windows))


@pytest.mark.parametrize("span", [False, True], ids=["epoch_windows", "windows_span_epochs"])
def test_a_checkpoint_keeps_the_partial_window(span: bool, tmp_path) -> None:
    """A checkpoint written at the end of the first epoch (the window open there when windows span
    epochs) and resumed ends where the uninterrupted fit ends, bitwise."""
    loader = DataLoader(data(32), batch_size=8)  # 4 micro-batches per epoch, windows of 3
    whole = Classifier(FixedSteps(3), span=span)
    trainer(max_epochs=3, callbacks=[SaveAfterFirstEpoch(tmp_path / "one.ckpt")]).fit(whole, loader)
    saved = torch.load(tmp_path / "one.ckpt", weights_only=False)["gradaccum"]
    assert saved["micro_batches"] == (1 if span else 0)
    resumed = Classifier(FixedSteps(3), span=span)
    fit = trainer(max_epochs=3)
    fit.fit(resumed, loader, ckpt_path=tmp_path / "one.ckpt")
    # 12 micro-batches of 8: windows of 3 across epochs, or 3 and the epoch's last 1
    expected = [24] * 4 if span else [24, 8] * 3
    assert [r.items for r in resumed.accumulator.history] == [r.items for r in whole.accumulator.history] == expected
    assert fit.global_step == len(expected)
    for ours, theirs in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(ours, theirs)


def test_an_interrupted_fit_keeps_the_open_window_in_its_checkpoint(tmp_path) -> None:
    """An exception mid-window applies nothing: the window stays in the Accumulator and in a
    checkpoint written then (as OnExceptionCheckpoint does), for a resumed fit to continue."""

    class Failing(Classifier):
        def training_step(self, batch, batch_idx):
            if self.trainer.current_epoch == 1 and batch_idx == 2:
                raise RuntimeError("interrupted")
            return super().training_step(batch, batch_idx)

    module = Failing(FixedSteps(3))
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer(max_epochs=2, callbacks=[SaveOnException(tmp_path / "on_exception.ckpt")]).fit(
            module, DataLoader(data(32), batch_size=8))
    assert module.accumulator.window_micro_batches == 2 and len(module.accumulator.history) == 2
    assert module.optimizer_steps == 2
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    assert saved["gradaccum"]["micro_batches"] == 2 and saved["global_step"] == 2


class Halves(Classifier):
    """Two ``accumulate`` calls per training_step: each batch's halves are micro-batches."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        for part in (slice(0, 4), slice(4, None)):
            self.accumulate(nn.functional.cross_entropy(self.net(x[part]), y[part]), len(y[part]))


def test_two_accumulate_calls_in_one_batch_are_refused_when_windows_end_with_the_epoch() -> None:
    """The epoch's last call closes its window: with several calls per batch that would cut the last
    batch, so the second call is refused (changing nothing) and names windows_span_epochs."""
    module = Halves(FixedSteps(3))
    with pytest.raises(ValueError, match="windows_span_epochs"):
        trainer(max_epochs=1).fit(module, DataLoader(data(32), batch_size=8))
    assert module.accumulator.window_micro_batches == 1 and module.optimizer_steps == 0


def test_windows_spanning_epochs_take_several_calls_per_batch() -> None:
    dataset = data(32)
    module = Halves(FixedSteps(3), span=True)
    initial = copy.deepcopy(module.net)
    fit = trainer(max_epochs=1)
    fit.fit(module, DataLoader(dataset, batch_size=8))
    assert [r.micro_batches for r in module.accumulator.history] == [3, 3, 2]
    assert fit.global_step == module.optimizer_steps == 3
    assert_weights(module, full_batch_steps(initial, dataset, [slice(0, 12), slice(12, 24), slice(24, 32)]))


def test_automatic_optimization_is_refused_by_name() -> None:
    module = Classifier(FixedSteps(2))
    module.automatic_optimization = True
    with pytest.raises(ValueError, match="automatic_optimization"):
        trainer(max_epochs=1).fit(module, DataLoader(data(16), batch_size=8))


def test_windows_span_epochs_must_be_a_bool() -> None:
    module = Classifier(FixedSteps(2))
    module.windows_span_epochs = "yes"
    with pytest.raises(TypeError, match="windows_span_epochs"):
        trainer(max_epochs=1).fit(module, DataLoader(data(16), batch_size=8))


@pytest.mark.slow
def test_ddp_with_two_processes_equals_one_process(tmp_path) -> None:
    """Two CPU processes (gloo, tests/_ddp_worker.py): each window is both ranks' micro-batches; both
    ranks' weights equal one process stepping on their union."""
    from .test_ddp import run_two_ranks

    ranks = run_two_ranks(tmp_path, "lightning")
    dataset = data(64)
    # Lightning gives each rank a DistributedSampler (shuffled, seed 0, epoch 0): window w is
    # both ranks' micro-batches 2w and 2w + 1
    orders = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        orders.append(list(sampler))
    reference = full_batch_steps(net(), dataset,
                                 [[i for order in orders for i in order[8 * w:8 * (w + 1)]] for w in range(4)])
    for result in ranks:
        assert result["global_step"] == 4
        for ours, theirs in zip(result["params"], reference.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-13)
