"""Transformers: a ``Trainer`` whose windows a planner sizes.

The Trainer decides a window before its backward: it prefetches the window's micro-batches
(``get_batch_samples``) to count ``num_items_in_batch`` over all of them, then runs their
backward and steps. A planner fits that shape natively (it sizes the next window from the
windows before it); a per-increment stopping rule (``GSNR``, ``NormTest``) cannot end a
prefetched window early and is refused: use its planner (``NoiseScalePlanner``,
``NormTestPlanner``, ``GSNRPlanner`` is per-element and refused too) or the Accumulator in a
hand-written loop.

``PlannedTrainer(model, args, planner=..., ...)`` is a ``Trainer`` in which:

- the data loader yields micro-batches of ``per_device_train_batch_size`` as usual, and each
  optimizer step takes ``planner.plan(history)`` of them: one Trainer step is one window, so
  ``global_step``, ``logging_steps``, ``save_steps`` and ``eval_steps`` count windows;
- every micro-batch's loss is weighted by the window's ``num_items_in_batch`` (the Trainer's
  own count, over the whole window and, under DDP, every process), so the applied gradient is
  the mean over the window's items (tokens that count, ``-100`` labels left out);
- the LR scheduler (the one the Trainer creates, or yours) steps once per micro-batch of
  every window: the schedule runs over samples, not windows, so windows of any size see the
  learning rate a fixed-batch run would at the same point of the data (``warmup_steps``
  counts micro-batches of ``per_device_train_batch_size`` per process);
- clipping (``max_grad_norm``), the optimizer, evaluation, logging and callbacks are the
  Trainer's; each window's record joins the logs (``gradaccum/items``,
  ``gradaccum/micro_batches``, ``gradaccum/noise_scale``...) and ``trainer.history``;
- a checkpoint holds the planner's history and the position in the epoch, and
  ``train(resume_from_checkpoint=...)`` continues with the same windows (the Trainer saves
  between windows, so no partial window exists to keep);
- under DDP each process takes the planned micro-batches of its shard; one gradient sync per
  window.

Planners that read the noise scale take it from per-sample gradient norms over the window's
micro-batches (the statistics of the Accumulator's norm path, exact or refused), under DDP
from a few scalars all-reduced per window.

Refused with the reason: ``gradient_accumulation_steps != 1`` (the planner sizes windows),
``max_steps`` (it counts windows, whose sizes are planned, and the Trainer would size the LR
schedule and the epochs from it: train by ``num_train_epochs``), the
``reduce_lr_on_plateau`` schedule, DeepSpeed and FSDP (they own the backward), a planner
whose ``micro_batch`` is not ``per_device_train_batch_size`` times the processes, ``fp16``
with a statistics planner, and unequal micro-batches when the model's loss is a mean (the
Trainer passes no ``num_items_in_batch`` to it; the mean of means would not be the mean).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._core.noise_scale import NormSums, noise_scale, pooled_terms
from .._core.planners import is_planner
from .._core.records import StepRecord
from .._files import write_atomic
from ..torch._stats import PerSampleGradStats
from ..torch._distributed import sum_over_ranks

STATE_FILE = "gradaccum_planner.json"
LOGGED = ("noise_scale", "trace", "squared_norm")


class Window(list):
    """The micro-batches (input dicts) of one planned window: what ``training_step`` receives."""


class PlannedTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps take windows sized by ``planner``.

    Args:
      *args: the Trainer's positional arguments (``model``, ``args``...).
      planner: a planner (``gradaccum.BatchRamp``, ``NoiseScalePlanner``, ``NormTestPlanner``);
        its ``micro_batch`` must be ``per_device_train_batch_size`` times the number of processes.
      **kwargs: the Trainer's keyword arguments.

    ``history`` holds every window's ``StepRecord``.
    """

    def __init__(self, *args: Any, planner: Any, **kwargs: Any) -> None:
        if not is_planner(planner):
            raise ValueError(
                f"planner: {type(planner).__name__} is not a planner. The Trainer decides a window's micro-batches "
                "before their backward (it prefetches them to count num_items_in_batch), so a rule that stops a "
                "window after a micro-batch cannot end it; use a planner (BatchRamp, NoiseScalePlanner, "
                "NormTestPlanner) or gradaccum.torch.Accumulator in a hand-written loop")
        super().__init__(*args, **kwargs)
        self.planner = planner
        self.history: list[StepRecord] = []
        self._check()
        self._stats: PerSampleGradStats | None = None
        self._position = 0  # micro-batches of the current epoch taken so far
        self._epoch = 0
        self._steps_in_epoch = 1
        self._resumed: dict[str, Any] | None = None
        self.add_callback(_WindowCallback(self))

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        args = self.args
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: the planner sizes the "
                             "windows; leave it at 1")
        if args.max_steps > 0:
            raise ValueError(f"max_steps={args.max_steps}: it counts windows, whose sizes the planner sets, and the "
                             "Trainer would size the LR schedule and the epochs from it; train by num_train_epochs")
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "reduce_lr_on_plateau":
            raise ValueError("lr_scheduler_type='reduce_lr_on_plateau': it steps on metrics, not over samples")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("DeepSpeed and FSDP own the backward and the gradient layout: use plain or DDP training")
        expected = args.per_device_train_batch_size * args.world_size
        if getattr(self.planner, "micro_batch", expected) != expected:
            raise ValueError(f"planner.micro_batch={self.planner.micro_batch}: it must be the samples of one "
                             f"micro-batch over all processes, per_device_train_batch_size x processes = {expected}")
        if self.planner.needs_statistics:
            if getattr(self.planner, "statistics", "norms") != "norms":
                raise ValueError(f"planner: {type(self.planner).__name__} needs per-element statistics, which the "
                                 "Trainer integration does not collect; use NoiseScalePlanner or NormTestPlanner")
            if args.fp16:
                raise ValueError("fp16=True: a statistics planner's per-sample norms would be taken under the "
                                 "loss scale of a GradScaler that may skip the step; use bf16 or 32-bit")

    # ------------------------------------------------------------------ windows
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The next window: ``planner.plan(history)`` micro-batches (fewer at the end of the
        epoch), counted together for ``num_items_in_batch``."""
        planned = int(self.planner.plan(self.history))
        batch, items = super().get_batch_samples(epoch_iterator, planned, device)
        self._position += len(batch)
        self._planned = planned
        return ([Window(batch)] if batch else []), items

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward over every micro-batch of the window (one gradient sync), then
        the window's record; the Trainer clips and steps after it."""
        if not isinstance(inputs, Window):
            return super().training_step(model, inputs, num_items_in_batch)
        sizes = [_samples(mb) for mb in inputs]
        if num_items_in_batch is None and len(set(sizes)) > 1:
            raise ValueError(
                f"num_items_in_batch: the model's loss is a mean over each micro-batch (its forward takes no "
                f"num_items_in_batch) and this window's micro-batches hold {sizes} samples, so the mean of their "
                "means is not the window's mean; set dataloader_drop_last=True or let the forward accept **kwargs")
        self.current_gradient_accumulation_steps = len(inputs)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        stats = self._statistics() if self.planner.needs_statistics else None
        params = [] if stats is None else stats.params
        units = self._units(num_items_in_batch, sizes[0], len(inputs))
        total = torch.zeros((), device=self.args.device)
        for i, micro_batch in enumerate(inputs):
            sync = i == len(inputs) - 1 and stats is None
            held = _stash(params)  # the window so far, apart from this micro-batch's gradient
            with (nullcontext() if sync or not ddp else self.accelerator.no_sync(model)):
                try:
                    total = total + super().training_step(model, micro_batch, num_items_in_batch)
                    if stats is not None:
                        stats.commit(samples=sizes[i], scale=units)
                except BaseException:
                    if stats is not None:
                        stats.discard()
                        stats.reset()
                    for p, window in zip(params, held):  # drop this micro-batch's part
                        p.grad = window
                    raise
            _unstash(params, held)
        info: dict[str, float] = {}
        if stats is not None:
            info = self._noise_info(stats, units, ddp)
            if ddp:
                _average_gradients(params, self.accelerator.num_processes)
        items = int(num_items_in_batch) if num_items_in_batch is not None else sum(sizes) * self.args.world_size
        self.history.append(StepRecord(
            step=len(self.history), items=items, micro_batches=len(inputs), skipped=False,
            reason="rule" if len(inputs) == self._planned else "flush",
            info={"planned": self._planned, **info}, samples=sum(sizes) * self.args.world_size))
        return total

    def _units(self, num_items: Any, size: int, micro_batches: int) -> float:
        """The factor between a per-sample gradient of the loss as the Trainer reduces it and the
        gradient of that sample's summed loss."""
        if num_items is None:
            return 1.0 / (size * micro_batches)
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return processes / float(num_items)

    def _statistics(self) -> PerSampleGradStats:
        if self._stats is None:
            model = self.accelerator.unwrap_model(self.model)
            self._stats = PerSampleGradStats(model, params=[p for p in model.parameters() if p.requires_grad],
                                             kind="norms")
        return self._stats

    def _noise_info(self, stats: PerSampleGradStats, units: float, ddp: bool) -> dict[str, float]:
        """The window's unbiased ``tr(Sigma)`` and ``|G|^2`` (pooled over processes from each
        one's norm sums: one all-reduce of five scalars) and their ratio."""
        try:
            sums = stats.norm_sums([p.grad for p in stats.params], units)
        finally:
            stats.reset()
        if ddp:
            flat = torch.tensor(list(sums), dtype=torch.float64)
            dist.all_reduce(flat)
            sums = NormSums(*flat.tolist())
        pooled = pooled_terms(sums)
        if pooled.samples < 2:
            return {}
        return {"samples": pooled.samples, "trace": pooled.trace, "squared_norm": pooled.squared_norm,
                "noise_scale": noise_scale(pooled.trace, pooled.squared_norm)}

    # ------------------------------------------------------------------ the schedule over samples
    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not isinstance(scheduler, PerMicroBatch):
            self.lr_scheduler = PerMicroBatch(scheduler, self)
        return self.lr_scheduler

    # ------------------------------------------------------------------ epochs, logs, checkpoints
    def _run_epoch(self, **kwargs: Any) -> Any:
        self._epoch, self._steps_in_epoch = kwargs["epoch"], max(kwargs["steps_in_epoch"], 1)
        resumed = kwargs["resume_from_checkpoint"] is not None and kwargs["epoch"] == kwargs["epochs_trained"]
        self._position = kwargs["steps_trained_in_current_epoch"] if resumed else 0
        return super()._run_epoch(**kwargs)

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: str | None, trial: Any) -> tuple[int, int]:
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     resume_from_checkpoint, trial)
        if resume_from_checkpoint is None:
            self.history = []
            return epochs, steps
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} has no {STATE_FILE}; it was not "
                             "saved by a PlannedTrainer, whose windows it cannot place in the data")
        with open(path) as f:
            saved = json.load(f)
        if saved["global_step"] != self.state.global_step:
            raise ValueError(f"resume_from_checkpoint: {STATE_FILE} is of step {saved['global_step']}, the "
                             f"Trainer's state of step {self.state.global_step}")
        self.history = [StepRecord(**r) for r in saved["history"]]
        # the Trainer places the resumed run by global_step (windows); the data is in micro-batches
        return saved["epoch"], 0 if self.args.ignore_data_skip else saved["position"]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = {"global_step": self.state.global_step, "epoch": self._epoch, "position": self._position,
                 "history": [r.as_dict() for r in self.history]}
        write_atomic(os.path.join(folder, STATE_FILE), json.dumps(state))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.history:
            record = self.history[-1]
            logs = {**logs, "gradaccum/items": float(record.items), "gradaccum/micro_batches": float(record.micro_batches)}
            logs.update({f"gradaccum/{k}": float(v) for k, v in record.info.items()
                         if k in LOGGED and math.isfinite(v)})
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs: Any) -> int:
        if isinstance(inputs, Window):
            return sum(super(PlannedTrainer, self).floating_point_ops(mb) for mb in inputs)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs: Any) -> None:
        for micro_batch in inputs if isinstance(inputs, Window) else [inputs]:
            super()._track_num_input_tokens(micro_batch)


class PerMicroBatch:
    """The Trainer's LR scheduler, stepped once per micro-batch of the window that just closed
    (the Trainer calls ``step()`` once per window): the schedule runs over samples."""

    def __init__(self, scheduler: Any, trainer: PlannedTrainer) -> None:
        self.scheduler = scheduler
        self._trainer = trainer

    def step(self, *args: Any, **kwargs: Any) -> None:
        history = self._trainer.history
        for _ in range(history[-1].micro_batches if history else 1):
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class _WindowCallback(TrainerCallback):
    """After each step: the record learns whether the step was skipped (fp16 overflow), and
    ``state.epoch`` is the fraction of the epoch's micro-batches taken (the Trainer would count
    windows)."""

    def __init__(self, trainer: PlannedTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if trainer.history and trainer.accelerator.optimizer_step_was_skipped:
            trainer.history[-1] = replace(trainer.history[-1], skipped=True)
        state.epoch = trainer._epoch + trainer._position / trainer._steps_in_epoch


def _samples(inputs: Any) -> int:
    """The leading size of the micro-batch's first tensor (its samples)."""
    for value in inputs.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("inputs: a micro-batch needs a tensor with the samples on dim 0")


def _stash(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    return held


def _unstash(params: list[torch.nn.Parameter], held: list[torch.Tensor | None]) -> None:
    """Add the micro-batch's gradient (now in ``.grad``) into the window held apart."""
    for p, window in zip(params, held):
        if window is None:
            continue
        if p.grad is not None:
            window.add_(p.grad)
        p.grad = window


def _average_gradients(params: list[torch.nn.Parameter], processes: int) -> None:
    """The window's one gradient sync (DDP's own was held back: per-sample norms need each
    process's gradient): the mean over processes of every ``.grad``, in one all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, summed in zip(params, sum_over_ranks(grads, dist.group.WORLD)):
        p.grad = summed / processes
