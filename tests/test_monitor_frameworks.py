"""Monitor in the frameworks' own loops: a wrapped optimizer is unwrapped, clipping as each
framework does it leaves the measurement alone, and each row equals the loop over samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradaccum.torch import Monitor
from gradaccum.torch._monitor import torch_optimizer

from . import zoo
from .test_integration_accelerate import fresh_accelerate_state  # noqa: F401 (autouse: Accelerate's singletons)
from .test_monitor import assert_terms, loop_terms, mean_loss

PATTERN = zoo.ZOO["mlp"]


def test_accelerate_prepared_optimizer_with_its_clipping() -> None:
    """``Accelerator().prepare(model, opt)`` gives an AcceleratedOptimizer (the Transformers
    Trainer's optimizer too); with ``accelerator.clip_grad_norm_`` in the loop every row is the
    loop's terms of its batch."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = zoo.build("mlp")
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    batches = [PATTERN.batch(6, 70 + k) for k in range(3)]
    with Monitor(model, opt) as monitor:
        for batch in batches:
            accelerator.backward(mean_loss(PATTERN, model, batch))
            accelerator.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
            opt.zero_grad()
    assert len(monitor.rows) == 3
    for row, batch in zip(monitor.rows, batches):
        assert_terms(row, loop_terms(model, PATTERN, batch))


class Classifier:
    """A LightningModule (built in ``make`` so Lightning is imported only by its test) whose
    Monitor is built on ``self.optimizers()``, a LightningOptimizer."""

    @staticmethod
    def make(model: nn.Module):
        import lightning.pytorch as L

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = model
                self.monitor: Monitor | None = None

            def on_train_start(self) -> None:
                self.monitor = Monitor(self.net, self.optimizers())

            def on_train_end(self) -> None:
                self.monitor.close()

            def training_step(self, batch, index):
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Module()


def test_lightning_optimizer_with_gradient_clipping() -> None:
    """A Trainer with ``gradient_clip_val`` steps through ``optimizer.step(closure)``: the
    backward runs inside the step, after its pre-hook; every row is the loop's terms."""
    import lightning.pytorch as L

    model = zoo.build("mlp")
    batches = [PATTERN.batch(6, 80 + k) for k in range(3)]
    x = torch.cat([b.x for b in batches])
    y = torch.cat([b.y for b in batches])
    module = Classifier.make(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, gradient_clip_val=1e-3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=6))
    rows = module.monitor.rows
    assert [r["step"] for r in rows] == [0.0, 1.0, 2.0]
    for row, batch in zip(rows, batches):
        assert_terms(row, loop_terms(model, PATTERN, batch))


def test_wrapped_optimizers_are_unwrapped_and_anything_else_is_refused() -> None:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = zoo.build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    assert torch_optimizer(opt) is opt
    assert torch_optimizer(LightningOptimizer(opt)) is opt
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        Monitor(model, object())


@pytest.mark.slow
def test_transformers_trainer_with_max_grad_norm(tmp_path) -> None:
    """The Trainer clips (``max_grad_norm``) and steps an AcceleratedOptimizer; a Monitor built
    in a callback's ``on_train_begin`` records every step, each the loop's terms of its batch."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Net(nn.Module):  # the model returns its own loss, as Transformers models do
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.body = body
            self.seen: list[zoo.Labeled] = []

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            if torch.is_grad_enabled():  # not the statistics' own probe of one sample
                self.seen.append(zoo.Labeled(x.detach().clone(), labels.clone()))
            logits = self.body(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Watch(TrainerCallback):
        monitor: Monitor | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.monitor = Monitor(model, optimizer)

        def on_train_end(self, args, state, control, **kwargs):
            self.monitor.close()

    batch = PATTERN.batch(18, 90)
    data = [{"x": batch.x[i], "labels": batch.y[i]} for i in range(len(batch))]
    net, watch = Net(zoo.build("mlp")), Watch()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=3, learning_rate=0.0,
                             max_grad_norm=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=net, args=args, train_dataset=data, callbacks=[watch]).train()
    rows = watch.monitor.rows
    assert [r["step"] for r in rows] == [0.0, 1.0, 2.0] and len(net.seen) == 3
    for row, seen in zip(rows, net.seen):
        assert_terms(row, loop_terms(net.body, PATTERN, seen))
