"""Transformers: a ``Trainer`` whose optimizer steps take windows of a fixed or planned length.

The Trainer decides a window before its backward: it prefetches the window's micro-batches
(``get_batch_samples``) to count ``num_items_in_batch`` over all of them, then runs their
backward and steps. A fixed window (``FixedSteps(k)``) and a planner (``BatchRamp``,
``NoiseScalePlanner``, ``NormTestPlanner``: it sizes the next window from the windows before
it) fit that shape; a per-increment stopping rule (``GSNR``, ``NormTest``) cannot end a
prefetched window early and is refused: use its planner, or the Accumulator in a hand-written
loop. ``GSNRPlanner`` reads per-element statistics and is refused too.

``PlannedTrainer(model, args, planner=..., ...)`` is a ``Trainer`` built on
``gradaccum.torch.Accumulator``:

- the data loader yields micro-batches of ``per_device_train_batch_size`` as usual, and each
  optimizer step takes a window of them (``k``, or ``planner.plan(history)``; fewer when the
  epoch ends first: a window never spans two epochs, as with ``gradient_accumulation_steps``,
  and the last one is stepped, never dropped). One Trainer step is one window, so
  ``global_step``, ``logging_steps``, ``save_steps`` and ``eval_steps`` count windows;
- the model's own loss (or ``compute_loss_func``) is computed as the Trainer computes it, with
  ``num_items_in_batch`` the window's items over every process (labels other than ``-100``,
  ``labels[..., 1:]`` for a causal LM's shifted loss, or the batch's ``shift_labels``), and the
  Accumulator weights each micro-batch by its items, so the applied gradient is the mean over
  the window's items on every process. When the Trainer counts no items (the model's forward
  takes no ``num_items_in_batch`` and there is no ``compute_loss_func``), each micro-batch's
  loss is taken as the mean over its samples, and a window of unequal micro-batches is refused.
  The float arithmetic of each loss is the Trainer's own (a model that computes its loss in
  float32 gets the same float32 gradient per token), so ``FixedSteps(k)`` ends at the weights of
  ``gradient_accumulation_steps=k`` to rounding; a NaN or infinite loss or gradient raises
  ``gradaccum.torch.NonFiniteError`` (the Accumulator's default) instead of being stepped on;
- the window's mean gradient then goes through the Trainer's own step: clipping
  (``max_grad_norm``), the optimizer, the LR scheduler, callbacks, logging, evaluation;
- the LR schedule (the one the Trainer creates from ``lr_scheduler_type``, ``warmup_steps``...,
  or yours) runs over optimizer steps with ``FixedSteps`` (``schedule_over="steps"``: each
  window steps it once; ``warmup_steps`` and the schedule's length count windows, exactly as
  with ``gradient_accumulation_steps=k``), and over the data with a planner, whose number of
  windows is not known in advance (``schedule_over="samples"``: each window steps it once per
  micro-batch it took, so ``warmup_steps`` and the schedule's length, ``num_train_epochs x
  len(train_dataloader)``, count micro-batches of ``per_device_train_batch_size`` samples per
  process: the optimizer steps the same run would take without accumulation, and a window of
  any size sees the learning rate that run would see at the same point of the data). A window
  the Accumulator skips (no items in it) does not step the schedule;
- each window's ``StepRecord`` is in ``trainer.history`` and joins the logs
  (``gradaccum/items``, ``gradaccum/micro_batches``, ``gradaccum/noise_scale``...);
- a checkpoint holds the windows' history and the position in the epoch
  (``gradaccum_planner.json``, validated when it is loaded), and
  ``train(resume_from_checkpoint=...)`` continues with the same windows (the Trainer saves
  between windows, so no partial window exists to keep);
- under DDP each process takes the window's micro-batches of its shard; the Accumulator
  all-reduces the window's gradient sums and items once, when it closes.

Planners that read the noise scale take it from the Accumulator's per-sample gradient norms
(exact or refused), under DDP from a few scalars per window.

Refused with the reason: ``gradient_accumulation_steps != 1`` (use ``FixedSteps(k)``),
``max_steps`` and a fractional ``num_train_epochs`` with a planner (its windows' sizes are
planned: train by whole epochs), ``max_steps`` with ``schedule_over="samples"``,
``schedule_over="steps"`` with a planner, the
``reduce_lr_on_plateau`` schedule, DeepSpeed, FSDP and ``DataParallel`` (use DDP), ``fp16``
(its loss scale belongs to the Trainer's backward; use bf16 or 32-bit), a planner whose
``micro_batch`` is not ``per_device_train_batch_size`` times the processes, and a planner whose
plan is not a positive int.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from dataclasses import fields
from typing import Any, cast

import torch
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, has_length

from .. import FixedSteps, Planner, StepRecord
from .._files import write_atomic
from ..torch import Accumulator

STATE_FILE = "gradaccum_planner.json"
STATE_KEYS = ("global_step", "epoch", "position", "history")
LOGGED = ("noise_scale", "trace", "squared_norm")
SCHEDULES = ("steps", "samples")
REASONS = ("rule", "flush", "nonfinite", "failed")
IGNORE_INDEX = -100


class Window(list):
    """The micro-batches (input dicts) of one window: what ``training_step`` receives.

    Attributes:
      counts: each micro-batch's items on this process (its samples when ``items`` is None).
      sizes: each micro-batch's samples.
      items: the window's items over every process, the ``num_items_in_batch`` its losses are
        computed with; None when the Trainer counts no items.
    """

    def __init__(self, micro_batches: list[Any], counts: list[int], sizes: list[int],
                 items: torch.Tensor | None) -> None:
        super().__init__(micro_batches)
        self.counts = counts
        self.sizes = sizes
        self.items = items


class PlannedTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps take windows of ``FixedSteps(k)`` or of
    a planner's length, accumulated by ``gradaccum.torch.Accumulator``.

    Args:
      *args: the Trainer's positional arguments (``model``, ``args``...).
      planner: ``gradaccum.FixedSteps(k)`` (windows of ``k`` micro-batches, the Trainer's own
        ``gradient_accumulation_steps=k``) or a planner (``BatchRamp``, ``NoiseScalePlanner``,
        ``NormTestPlanner``), whose ``micro_batch`` must be ``per_device_train_batch_size``
        times the number of processes.
      schedule_over: what the LR schedule counts: ``"steps"`` (optimizer steps, the default
        with ``FixedSteps``) or ``"samples"`` (micro-batches of the data, the default with a
        planner); see the module's docstring.
      **kwargs: the Trainer's keyword arguments.

    ``history`` holds every window's ``StepRecord`` (the Accumulator's). With the model's own
    loss, as with the Trainer::

        model = GPT2LMHeadModel(GPT2Config(...))  # returns its loss from input_ids and labels
        trainer = PlannedTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=4),
                                 train_dataset=train, planner=FixedSteps(8))  # = gradient_accumulation_steps=8
        trainer = PlannedTrainer(model=model, args=args, train_dataset=train,
                                 planner=BatchRamp(start=4, end=64, over=100_000, micro_batch=4))
    """

    def __init__(self, *args: Any, planner: Any, schedule_over: str | None = None, **kwargs: Any) -> None:
        self._fixed = _fixed_window(planner)
        if schedule_over is None:
            schedule_over = "steps" if self._fixed is not None else "samples"
        if schedule_over not in SCHEDULES:
            raise ValueError(f"schedule_over must be 'steps' or 'samples', got {schedule_over!r}")
        if schedule_over == "steps" and self._fixed is None:
            raise ValueError(
                "schedule_over='steps': the planner's windows vary, so the number of optimizer steps, which a "
                "schedule over steps is sized by, is not known in advance; use schedule_over='samples' (the "
                "schedule over the data) or FixedSteps(k)")
        super().__init__(*args, **kwargs)
        self.planner = planner
        self.schedule_over = schedule_over
        self._check(self.args)
        if self._fixed is None:
            _checked_plan(planner, [])  # a planner that cannot plan its first window is refused now
        self._accumulator: Accumulator | None = None
        self._handoff: _Handoff | None = None
        self._resumed: dict[str, Any] | None = None  # the validated gradaccum_planner.json of the checkpoint
        self._resumed_from: str | None = None
        self._schedule_steps: int | None = None
        self._shifted = False  # whether the model's loss shifts its labels (set when training starts)
        self._position = 0  # micro-batches of the current epoch taken so far
        self._epoch = 0
        self._steps_in_epoch = 1
        self.add_callback(_WindowCallback(self))

    @property
    def history(self) -> list[StepRecord]:
        """Every window's record (those of the last ``train()``)."""
        return [] if self._accumulator is None else self._accumulator.history

    # ------------------------------------------------------------------ checks
    def _check(self, args: Any) -> None:
        """Refuse what cannot work, by name: at construction and again at ``train()`` (the
        arguments may have changed in between)."""
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: the windows are the "
                             "planner's; leave it at 1 (for windows of k micro-batches, planner=FixedSteps(k))")
        if self._fixed is None and args.max_steps > 0:
            raise ValueError(f"max_steps={args.max_steps}: it counts optimizer steps, whose windows the planner "
                             "sizes, so it cannot say how much data the run takes or size the LR schedule; train by "
                             "num_train_epochs (or use FixedSteps(k))")
        if self.schedule_over == "samples" and args.max_steps > 0:
            raise ValueError(f"max_steps={args.max_steps}: it counts optimizer steps, and the LR schedule is over "
                             "samples; train by num_train_epochs, or use schedule_over='steps'")
        if self._fixed is None and args.num_train_epochs != int(args.num_train_epochs):
            raise ValueError(f"num_train_epochs={args.num_train_epochs}: the Trainer stops a fractional epoch after "
                             "a number of optimizer steps, which the planner's windows do not fix; train by whole "
                             "epochs")
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "reduce_lr_on_plateau":
            raise ValueError("lr_scheduler_type='reduce_lr_on_plateau': it steps on metrics, not over windows")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("DeepSpeed and FSDP own the backward and the gradient layout: use plain or DDP training")
        if args.n_gpu > 1:
            raise ValueError(f"n_gpu={args.n_gpu}: DataParallel is not supported; launch one process per GPU "
                             "(torchrun) for DDP")
        if args.fp16:
            raise ValueError("fp16=True: its GradScaler belongs to the Trainer's backward, which the Accumulator "
                             "replaces; use bf16 or 32-bit")
        if self._fixed is not None:
            return
        expected = args.per_device_train_batch_size * args.world_size
        if getattr(self.planner, "micro_batch", expected) != expected:
            raise ValueError(f"planner.micro_batch={self.planner.micro_batch}: it must be the samples of one "
                             f"micro-batch over all processes, per_device_train_batch_size x processes = {expected}")
        if self.planner.needs_statistics and getattr(self.planner, "statistics", "elements") != "norms":
            raise ValueError(f"planner: {type(self.planner).__name__} needs per-element statistics, whose window "
                             "sums the Trainer's step cannot take over; use NoiseScalePlanner or NormTestPlanner")

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None) -> Any:
        """The Trainer's ``train``; the arguments are checked and a checkpoint's window state is
        read and validated first, before anything (the model's weights included) is loaded."""
        self._check(self.args)
        checkpoint: str | None
        if resume_from_checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        elif resume_from_checkpoint is False:
            checkpoint = None
        else:
            checkpoint = resume_from_checkpoint
        self._resumed = None if checkpoint is None else self._read_state(checkpoint)
        self._resumed_from = checkpoint
        return super().train(resume_from_checkpoint=checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple[int, int, int, int, int, Any, int]:
        """The Trainer's epochs, steps and batch sizes: with ``FixedSteps(k)`` exactly those of
        ``gradient_accumulation_steps=k``; with a planner those of its micro-batches."""
        if self._fixed is not None:
            args = copy.copy(args)
            args.gradient_accumulation_steps = self._fixed
        values = super().set_initial_training_values(args, dataloader)
        steps_in_epoch, max_steps = values[5], values[6]
        if self.schedule_over == "steps":
            self._schedule_steps = max_steps
        else:
            self._schedule_steps = math.ceil(args.num_train_epochs * steps_in_epoch)
        return values

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        """The Trainer's preparation, then the Accumulator over the model it trains (DDP-wrapped
        when distributed); a resumed run's history restored into it."""
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model.zero_grad(set_to_none=True)  # as the Trainer does before its first step
        self._shifted = self._loss_shifts()
        if self.optimizer is None:  # the Trainer creates it before this point
            raise RuntimeError("PlannedTrainer: the Trainer prepared training without an optimizer")
        self._handoff = _Handoff(self.optimizer)
        self._accumulator = Accumulator(model, self._handoff, self.planner)
        if self._resumed is not None:
            self._restore_history(self._resumed)
        return model, train_dataloader

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The Trainer's scheduler, sized in the unit of ``schedule_over`` and stepped per window."""
        steps = self._schedule_steps if self._schedule_steps is not None else num_training_steps
        scheduler = super().create_scheduler(steps, optimizer)
        if not isinstance(scheduler, WindowSchedule):
            self.lr_scheduler = cast(Any, WindowSchedule(scheduler, self))  # the Trainer's attribute, wrapped
        return self.lr_scheduler

    # ------------------------------------------------------------------ windows
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The next window: its planned micro-batches (fewer at the end of the epoch), and their
        items over every process, the window's ``num_items_in_batch``."""
        batch = []
        for _ in range(self._window_length()):
            try:
                batch.append(next(epoch_iterator))
            except StopIteration:
                break
        self._position += len(batch)
        if not batch:
            return [], None
        window = self._window(batch, device)
        return [window], window.items

    def _window_length(self) -> int:
        if self._fixed is not None:
            return self._fixed
        planned = self._accumulator.planned_micro_batches  # type: ignore[union-attr]
        if isinstance(planned, bool) or not isinstance(planned, numbers.Integral) or planned < 1:
            raise ValueError(f"planner: {type(self.planner).__name__}.plan(history) must return a positive int (the "
                             f"window's micro-batches), got {planned!r} after {len(self.history)} window(s)")
        return int(planned)

    def _window(self, batch: list[Any], device: torch.device) -> Window:
        """The window with its counts: the items of each micro-batch as the Trainer counts them,
        added over processes; or, when the Trainer counts none, each micro-batch's samples."""
        sizes = [_samples(micro_batch) for micro_batch in batch]
        labels = self._labels_that_count(batch)
        if labels is None:
            return Window(batch, sizes, sizes, None)
        counts = [int((labels_ != IGNORE_INDEX).sum()) for labels_ in labels]
        items = torch.tensor(sum(counts), device=device)
        if self.accelerator.num_processes > 1:
            items = self.accelerator.reduce(items, reduction="sum")
        return Window(batch, counts, sizes, items)

    def _labels_that_count(self, batch: list[Any]) -> list[torch.Tensor] | None:
        """Each micro-batch's labels that its loss predicts (``shift_labels``, ``labels[..., 1:]``
        for a causal LM, else ``labels``); None when the Trainer passes no ``num_items_in_batch``
        (no labels, or neither a forward that takes it nor a ``compute_loss_func``)."""
        if "labels" not in batch[0] or not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        out = []
        for micro_batch in batch:
            labels = micro_batch.get("shift_labels")
            if labels is None:
                labels = micro_batch.get("labels")
                labels = labels[..., 1:] if self._shifted and torch.is_tensor(labels) else labels
            if not torch.is_tensor(labels):
                return None  # as the Trainer: labels it cannot count give no num_items_in_batch
            out.append(labels)
        return out

    def _loss_shifts(self) -> bool:
        """Whether the model's loss shifts its labels (a causal LM's): the Trainer's own answer, or
        the model's loss function (a model built from a config has no ``loss_type`` it reads)."""
        model = self.accelerator.unwrap_model(self.model)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return False
        trainer_says = bool(getattr(self, "_loss_shifts_labels", False))
        return trainer_says or getattr(model, "loss_function", None) is ForCausalLMLoss

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward of every micro-batch of the window through the Accumulator (one
        gradient sync, at its close); the window's mean gradient is then in ``.grad`` for the
        Trainer's clipping and step. Returns the window's loss as the Trainer would log it."""
        if not isinstance(inputs, Window):
            raise TypeError(f"inputs: PlannedTrainer steps windows of micro-batches, got {type(inputs).__name__}")
        if inputs.items is None and len(set(inputs.sizes)) > 1:
            raise ValueError(
                f"num_items_in_batch: the model's loss is a mean over each micro-batch (its forward takes no "
                f"num_items_in_batch) and this window's micro-batches hold {inputs.sizes} samples, so the Trainer "
                "cannot count the window's items; set dataloader_drop_last=True or let the forward accept **kwargs")
        acc = self._accumulator
        assert acc is not None and self._handoff is not None
        self.current_gradient_accumulation_steps = len(inputs)
        self._handoff.gradient = None
        total = torch.zeros((), device=self.args.device)
        for micro_batch, count, size in zip(inputs, inputs.counts, inputs.sizes):
            loss = self._loss(model, micro_batch, inputs.items)
            total = total + loss.detach()
            self._backward(loss, count, size, inputs.items)
        acc.flush()  # the window the epoch ended before its plan; nothing when it closed at its plan
        self._hand_over(inputs.items)
        if inputs.items is None:
            return total / len(inputs)  # the Trainer's mean of the micro-batches' means
        return total * (self.accelerator.num_processes / self._loss_processes())

    def _loss(self, model: torch.nn.Module, micro_batch: Any, items: torch.Tensor | None) -> torch.Tensor:
        """The micro-batch's loss as the Trainer computes it (the model's own, or
        ``compute_loss_func``), over the window's ``num_items_in_batch``."""
        model.train()
        train = getattr(self.optimizer, "train", None)  # schedule-free optimizers
        if callable(train):
            train()
        inputs = self._prepare_inputs(micro_batch)
        with self.compute_loss_context_manager():
            # without return_outputs the Trainer's compute_loss returns the loss alone
            return cast(torch.Tensor, self.compute_loss(model, inputs, num_items_in_batch=items))

    def _loss_processes(self) -> int:
        """The factor the Trainer's ``compute_loss`` multiplies a loss over ``num_items_in_batch``
        by (``average_tokens_across_devices``: the processes, whose DDP average divides it out)."""
        if not self.args.average_tokens_across_devices:
            return 1
        return self.accelerator.num_processes // self.get_tp_size()

    def _backward(self, loss: torch.Tensor, count: int, size: int, items: torch.Tensor | None) -> None:
        """One micro-batch into the window. The loss over the window's items (``items``) is the
        micro-batch's summed loss divided by ``items``: with statistics it goes in as that sum (the
        per-sample norms are in its units); without, it goes in as it is, so the float32 loss of a
        model that upcasts its logits sees the Trainer's arithmetic, and ``_hand_over`` multiplies
        the window's mean by ``items`` back."""
        acc = self._accumulator
        assert acc is not None
        if items is None:
            acc.backward(loss, size, reduction="mean", samples=size)
        elif self.planner.needs_statistics:
            acc.backward(loss * (float(items) / self._loss_processes()), count, reduction="sum", samples=size)
        else:
            acc.backward(loss, count, reduction="sum", samples=size)

    def _hand_over(self, items: torch.Tensor | None) -> None:
        """The window's mean gradient, which the Accumulator handed to ``_Handoff.step``, into
        ``.grad`` for the Trainer's step (nothing when the Accumulator skipped the window)."""
        handoff = self._handoff
        assert handoff is not None
        gradient, handoff.gradient = handoff.gradient, None
        if gradient is None:
            return
        factor = 1.0
        if items is not None and not self.planner.needs_statistics:
            factor = float(items) / self._loss_processes()
        for p, g in gradient:
            p.grad = g if factor == 1.0 else g.mul_(factor)

    # ------------------------------------------------------------------ epochs, logs, checkpoints
    def _run_epoch(self, **kwargs: Any) -> Any:  # type: ignore[override]  # the Trainer passes keywords only
        self._epoch, self._steps_in_epoch = kwargs["epoch"], max(kwargs["steps_in_epoch"], 1)
        resumed = kwargs["resume_from_checkpoint"] is not None and kwargs["epoch"] == kwargs["epochs_trained"]
        self._position = kwargs["steps_trained_in_current_epoch"] if resumed else 0
        # the Trainer loops over optimizer steps; a window takes at least one micro-batch, so as many
        # iterations as micro-batches take every window (the ones after the data fetch nothing)
        kwargs["num_update_steps_per_epoch"] = kwargs["steps_in_epoch"]
        return super()._run_epoch(**kwargs)

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: str | None, trial: Any) -> tuple[int, int]:
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     resume_from_checkpoint, trial)
        saved = self._resumed
        if resume_from_checkpoint is None or saved is None:
            return epochs, steps
        if saved["global_step"] != self.state.global_step:
            raise ValueError(f"resume_from_checkpoint: {STATE_FILE} is of step {saved['global_step']}, the "
                             f"Trainer's state of step {self.state.global_step}")
        # the Trainer places the resumed run by global_step (windows); the data is in micro-batches
        return saved["epoch"], 0 if self.args.ignore_data_skip else saved["position"]

    def _read_state(self, folder: str) -> dict[str, Any]:
        """``gradaccum_planner.json`` of the checkpoint ``folder``, every value validated against
        the checkpoint's Trainer state and this run's data and epochs; ValueError naming the key
        and the file otherwise."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {folder} has no {STATE_FILE}; it was not saved by a "
                             "PlannedTrainer, whose windows it cannot place in the data")
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{path}: not a {STATE_FILE} written by PlannedTrainer ({error})") from None
        state = _checked_state(saved, path)
        trainer_state = os.path.join(folder, "trainer_state.json")
        if os.path.isfile(trainer_state):
            step = TrainerState.load_from_json(trainer_state).global_step
            if state["global_step"] != step:
                raise ValueError(f"{path}: 'global_step' is {state['global_step']}, but {trainer_state} is of step "
                                 f"{step}: the files are of different checkpoints")
        dataloader = self.get_train_dataloader()
        epochs, _, _, _, _, steps_in_epoch, _ = self.set_initial_training_values(self.args, dataloader)
        if state["epoch"] >= epochs:
            raise ValueError(f"{path}: 'epoch' is {state['epoch']}, but this run trains {epochs} epoch(s) "
                             f"(0 to {epochs - 1})")
        if has_length(dataloader):
            if state["position"] > steps_in_epoch:
                raise ValueError(f"{path}: 'position' is {state['position']}, past the epoch's {steps_in_epoch} "
                                 "micro-batches (a checkpoint of other data or another batch size)")
            taken = sum(r["micro_batches"] for r in state["history"])
            if taken != state["epoch"] * steps_in_epoch + state["position"]:
                raise ValueError(f"{path}: 'history' holds {taken} micro-batches, but 'epoch' {state['epoch']} and "
                                 f"'position' {state['position']} of {steps_in_epoch} micro-batches per epoch place "
                                 f"the run after {state['epoch'] * steps_in_epoch + state['position']}")
        return state

    def _restore_history(self, saved: dict[str, Any]) -> None:
        """The checkpoint's windows into the new Accumulator (its public state, validated by it)."""
        acc = self._accumulator
        assert acc is not None
        state = acc.state_dict()
        state.update(history=saved["history"], steps=len(saved["history"]),
                     items_seen=sum(r["items"] for r in saved["history"]))
        try:
            acc.load_state_dict(state)
        except (TypeError, ValueError) as error:
            path = os.path.join(str(self._resumed_from), STATE_FILE)
            raise ValueError(f"{path}: 'history' is refused by the Accumulator: {error}") from None

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
            logs = {**logs, "gradaccum/items": float(record.items),
                    "gradaccum/micro_batches": float(record.micro_batches)}
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


class _Handoff(torch.optim.Optimizer):
    """The optimizer the Accumulator steps: its ``step`` takes the window's mean gradient (which
    the Accumulator then clears from ``.grad``) for ``PlannedTrainer`` to hand to the Trainer's
    clipping and optimizer. It holds no state of its own: its ``param_groups`` are the Trainer's
    optimizer's (the Accumulator reads them and records their learning rates)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        params = list({id(p): p for group in optimizer.param_groups for p in group["params"]}.values())
        super().__init__(params, {})
        self.param_groups = optimizer.param_groups  # the same groups (dicts), not copies
        self.gradient: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.gradient = [(p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]


class WindowSchedule:
    """The Trainer's LR scheduler, stepped by the Trainer once per window: once
    (``schedule_over="steps"``) or once per micro-batch of the window (``"samples"``), and not
    for a window the Accumulator skipped. Everything else is the scheduler's."""

    def __init__(self, scheduler: Any, trainer: PlannedTrainer) -> None:
        self.scheduler = scheduler
        self._trainer = trainer

    def step(self, *args: Any, **kwargs: Any) -> None:
        history = self._trainer.history
        record = history[-1] if history else None
        if record is not None and record.skipped:
            return
        times = record.micro_batches if record is not None and self._trainer.schedule_over == "samples" else 1
        for _ in range(times):
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class _WindowCallback(TrainerCallback):
    """After each step, ``state.epoch`` is the fraction of the epoch's micro-batches taken (the
    Trainer would count windows)."""

    def __init__(self, trainer: PlannedTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        state.epoch = trainer._epoch + trainer._position / trainer._steps_in_epoch


def _fixed_window(planner: Any) -> int | None:
    """``k`` of ``FixedSteps(k)``; None for a planner; anything else refused."""
    if isinstance(planner, FixedSteps):
        return planner.k
    if isinstance(planner, Planner) and not isinstance(planner, type):
        return None
    raise ValueError(
        f"planner: {type(planner).__name__} is not a planner. The Trainer decides a window's micro-batches "
        "before their backward (it prefetches them to count num_items_in_batch), so a rule that stops a "
        "window after a micro-batch cannot end it; use FixedSteps(k), a planner (BatchRamp, NoiseScalePlanner, "
        "NormTestPlanner) or gradaccum.torch.Accumulator in a hand-written loop")


def _checked_plan(planner: Any, history: list[StepRecord]) -> int:
    """``planner.plan(history)`` if it is a positive int (a window of micro-batches)."""
    value = planner.plan(history)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"planner: {type(planner).__name__}.plan(history) must return a positive int (the "
                         f"window's micro-batches), got {value!r}")
    return int(value)


def _checked_state(saved: Any, path: str) -> dict[str, Any]:
    """The keys and values of ``gradaccum_planner.json`` that need no run to check: counters,
    and the history record by record; ValueError naming the key and the file."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(saved).__name__}")
    missing = [k for k in STATE_KEYS if k not in saved]
    unknown = [k for k in saved if k not in STATE_KEYS]
    if missing or unknown:
        raise ValueError(f"{path}: must hold exactly {', '.join(STATE_KEYS)}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unknown {', '.join(map(str, unknown))}" if unknown else ""))
    for key in ("global_step", "epoch", "position"):
        _check_count(path, key, saved[key], 0)
    history = saved["history"]
    if not isinstance(history, list):
        raise ValueError(f"{path}: 'history' must be a list of step records, got {type(history).__name__}")
    if len(history) != saved["global_step"]:
        raise ValueError(f"{path}: 'history' holds {len(history)} records for 'global_step' {saved['global_step']}: "
                         "one record per window (a history emptied or cut cannot place the run's windows)")
    for k, record in enumerate(history):
        _check_record(path, f"history[{k}]", record, k)
    return saved


def _check_record(path: str, where: str, record: Any, index: int) -> None:
    """One step record as ``StepRecord.as_dict`` wrote it."""
    names = [f.name for f in fields(StepRecord)]
    if not isinstance(record, dict) or sorted(record) != sorted(names):
        raise ValueError(f"{path}: '{where}' must be a step record with the keys {', '.join(names)}, got {record!r}")
    _check_count(path, f"{where}['step']", record["step"], index, index)
    _check_count(path, f"{where}['items']", record["items"], 0)
    _check_count(path, f"{where}['micro_batches']", record["micro_batches"], 1)
    if record["samples"] is not None:
        _check_count(path, f"{where}['samples']", record["samples"], 1)
    if not isinstance(record["skipped"], bool):
        raise ValueError(f"{path}: '{where}['skipped']' must be true or false, got {record['skipped']!r}")
    if record["reason"] not in REASONS:
        raise ValueError(f"{path}: '{where}['reason']' must be one of {', '.join(REASONS)}, got {record['reason']!r}")
    norm = record["grad_norm"]
    if norm is not None and not (_is_real(norm) and 0 <= norm < math.inf):
        raise ValueError(f"{path}: '{where}['grad_norm']' must be null or a finite norm >= 0, got {norm!r}")
    lrs = record["lr"]
    if not isinstance(lrs, list) or not all(_is_real(lr) and 0 <= lr < math.inf for lr in lrs):
        raise ValueError(f"{path}: '{where}['lr']' must be a list of finite learning rates >= 0, got {lrs!r}")
    info = record["info"]
    if not isinstance(info, dict) or not all(isinstance(k, str) and _is_real(v) for k, v in info.items()):
        raise ValueError(f"{path}: '{where}['info']' must map names to numbers, got {info!r}")
    if "planned" in info:
        _check_count(path, f"{where}['info']['planned']", info["planned"], 1)
    _check_noise_terms(path, f"{where}['info']", info, applied=not record["skipped"])


def _check_noise_terms(path: str, where: str, info: dict[str, Any], applied: bool) -> None:
    """The noise terms the planners read: ``trace`` >= 0 (NaN: nothing measured); where it counts
    (a finite trace of an applied window) ``squared_norm`` finite, ``samples`` >= 2 and ``gsnr``
    finite and >= 0."""
    if "trace" not in info:
        return
    trace = info["trace"]
    if not (trace >= 0 or math.isnan(trace)):
        raise ValueError(f"{path}: '{where}['trace']' must be >= 0 (or NaN: nothing measured), got {trace!r}")
    if not (applied and math.isfinite(trace)):
        return
    if not math.isfinite(info.get("squared_norm", math.nan)):
        raise ValueError(f"{path}: '{where}['squared_norm']' must be finite where the trace is, got "
                         f"{info.get('squared_norm')!r}")
    if not 0 <= info.get("gsnr", 0.0) < math.inf:
        raise ValueError(f"{path}: '{where}['gsnr']' must be finite and >= 0, got {info['gsnr']!r}")
    _check_count(path, f"{where}['samples']", info.get("samples"), 2)


def _check_count(path: str, key: str, value: Any, low: int, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        wanted = f"{low}" if high == low else f"an int >= {low}"
        raise ValueError(f"{path}: '{key}' must be {wanted}, got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _samples(inputs: Any) -> int:
    """The leading size of the micro-batch's first tensor (its samples)."""
    for value in inputs.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("inputs: a micro-batch needs a tensor with the samples on dim 0")
