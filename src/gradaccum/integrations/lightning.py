"""Lightning: windows decided by a rule or a planner, over manual optimization.

Lightning's ``accumulate_grad_batches`` closes a window every k batches (``{epoch: k}``
schedules at most); a rule that decides after each micro-batch, or a planner, needs the
optimizer step in the module's hands, which is what manual optimization gives. Mix
``Accumulating`` into a ``LightningModule``, set ``self.automatic_optimization = False``, return
the rule or planner from ``configure_accumulation`` and call ``self.accumulate(loss, count)`` in
``training_step``:

- the Accumulator is built when training starts, over the strategy's model (the DDP wrapper
  under ``strategy="ddp"``/``"ddp_spawn"``: one gradient sync per window), the
  ``LightningOptimizer`` (so ``trainer.global_step`` counts optimizer steps, i.e. windows, and
  ``max_steps`` means windows) and the scheduler of ``configure_optimizers``, which it steps
  once per window;
- a window ends with its epoch, as with ``accumulate_grad_batches``: the epoch's last batch
  closes the window still open, a partial window averaged over the items it holds, in that
  batch's ``training_step`` (before the epoch-end validation and checkpoints). Call
  ``accumulate`` once per ``training_step``: a second call in one batch is refused, since the
  last batch's call closes the epoch's window. An epoch cut short (``trainer.should_stop``, a
  ``Timer``, ``on_train_batch_start`` returning -1, a last batch that called no ``accumulate``)
  closes its window in ``on_train_epoch_end``;
- with ``windows_span_epochs = True`` (a class attribute, or set in ``__init__``) windows run on
  across epochs (a planner's windows are not cut at every epoch's end, and ``accumulate`` may be
  called several times per ``training_step``); the window still open when the fit ends is then
  applied as a partial window, in ``on_train_end``;
- every step of a window, the partial ones included, goes through the ``LightningOptimizer``
  and counts in ``trainer.global_step``; ``max_steps`` is reached only when a window closes, so
  it never ends a fit on an open window;
- each window's record goes to ``self.log`` (``gradaccum/items``, ``gradaccum/micro_batches``
  and the rule's numbers: ``gsnr``, ``noise_scale``...), on the step that closed it (a window
  closed in ``on_train_epoch_end`` as an epoch metric, one closed in ``on_train_end`` straight
  to the trainer's loggers, where ``self.log`` is not allowed);
- the partial window is saved in Lightning's checkpoints (``on_save_checkpoint``) and restored
  when a fit resumes from one (``ckpt_path=``). An interrupted fit (an exception, Ctrl-C)
  applies nothing: the open window stays in ``self.accumulator`` and in a checkpoint written
  then (``OnExceptionCheckpoint``), and a fit resumed from that checkpoint continues it.

With a statistics rule or planner, call the module itself (``self(x)``, its ``forward``) in
``training_step``: the statistics hook the model's forward to count samples and to tell
per-sample layers from broadcast ones.

A module that overrides ``on_train_start``, ``on_train_epoch_end``, ``on_train_end``,
``on_save_checkpoint`` or ``on_load_checkpoint`` calls ``super()`` in it: the mixin builds the
Accumulator, closes the windows and keeps the checkpoints there.

Refused with the reason: automatic optimization (Lightning would step the optimizer itself),
``precision="16-mixed"`` (Lightning's GradScaler steps through the ``LightningOptimizer``, the
Accumulator would scale a second time; ``bf16-mixed`` and 32/64-bit work), more than one
optimizer, and a second ``accumulate`` in one ``training_step`` unless ``windows_span_epochs``.
"""

from __future__ import annotations

import math
from typing import Any

from .._core.records import StepRecord
from ..torch import Accumulator

LOGGED = ("gsnr", "norm_test", "noise_scale", "planned")


class Accumulating:
    """Mixin for a ``LightningModule`` (``class Module(Accumulating, L.LightningModule)``)."""

    accumulation_kwargs: dict[str, Any] = {}
    """Keyword arguments of the Accumulator (``clip_grad_norm``, ``nonfinite``, ``lr_schedule``...)."""

    _gradaccum_batch: int | None = None
    """The batch index of this epoch's last ``accumulate`` call (None: none yet)."""

    windows_span_epochs: bool = False
    """False (default): the epoch's last batch closes the open window, as ``accumulate_grad_batches``
    does. True: windows run on across epochs, and the window open at the end of the fit is applied then."""

    def configure_accumulation(self) -> Any:
        """The stopping rule or planner that decides the windows (override it)."""
        raise NotImplementedError("configure_accumulation: return a rule or planner, e.g. gradaccum.FixedSteps(4)")

    @property
    def accumulator(self) -> Accumulator:
        """The Accumulator of the current fit (built when training starts)."""
        if getattr(self, "_gradaccum", None) is None:
            raise RuntimeError("the Accumulator is built when training starts (on_train_start)")
        return self._gradaccum

    def accumulate(self, loss: Any, count: Any, **kwargs: Any) -> bool:
        """``Accumulator.backward(loss, count, ...)``; logs the window's record when it closes.

        Unless ``windows_span_epochs``, the epoch's last batch then closes the window still open
        (a partial window). Returns True when the optimizer stepped.
        """
        batch = self._batch_index()
        if not self.windows_span_epochs and batch == getattr(self, "_gradaccum_batch", None):
            raise ValueError("accumulate: called twice in one training_step; a window ends with its epoch, closed by "
                             "the call of the epoch's last batch, so call it once per training_step (one micro-batch "
                             "per batch) or set windows_span_epochs = True to let windows run across epochs")
        stepped = self.accumulator.backward(loss, count, **kwargs)
        self._gradaccum_batch = batch
        if stepped:
            self._log_window(on_step=True)
        elif not self.windows_span_epochs and self._last_batch_of_epoch():
            stepped = self._close_window("step")
        return stepped

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if self.automatic_optimization:  # type: ignore[attr-defined]
            raise ValueError("automatic_optimization: set self.automatic_optimization = False in __init__; the "
                             "Accumulator steps the optimizer when its rule closes a window")
        if not isinstance(self.windows_span_epochs, bool):
            raise TypeError(f"windows_span_epochs must be True or False, got {self.windows_span_epochs!r}")
        if "16-mixed" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            raise ValueError(f"precision={trainer.precision!r}: Lightning's GradScaler steps through the optimizer "
                             "and the Accumulator would scale a second time; use 'bf16-mixed' or 32-bit")
        optimizers = self.optimizers()  # type: ignore[attr-defined]
        if isinstance(optimizers, list):
            raise ValueError(f"configure_optimizers: one optimizer is supported, got {len(optimizers)}")
        schedulers = self.lr_schedulers()  # type: ignore[attr-defined]
        if isinstance(schedulers, list):
            raise ValueError(f"configure_optimizers: one scheduler is supported, got {len(schedulers)}")
        self._gradaccum = Accumulator(trainer.strategy.model, optimizers, self.configure_accumulation(),
                                      scheduler=schedulers, **self.accumulation_kwargs)
        self._gradaccum_batch = None
        pending = getattr(self, "_gradaccum_pending", None)
        if pending is not None:
            self._gradaccum.load_state_dict(pending)
            self._gradaccum_pending = None

    def on_train_epoch_end(self) -> None:
        """An epoch cut short (or whose last batch called no ``accumulate``) closes its window here."""
        if not self.windows_span_epochs:
            self._close_window("epoch")

    def on_train_end(self) -> None:
        """The window still open when the fit ends (``windows_span_epochs``) is applied, never dropped."""
        self._close_window("fit")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if getattr(self, "_gradaccum", None) is not None:
            checkpoint["gradaccum"] = self._gradaccum.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._gradaccum_pending = checkpoint.get("gradaccum")

    # ------------------------------------------------------------------ the partial window
    def _batch_index(self) -> int:
        """The fit's running batch number (Lightning's, restored with a checkpoint)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.ready)  # type: ignore[attr-defined]

    def _last_batch_of_epoch(self) -> bool:
        """Whether the batch in ``training_step`` is the epoch's last, as Lightning decides it
        (``_TrainingEpochLoop._num_ready_batches_reached``: ``limit_train_batches`` included)."""
        trainer = self.trainer  # type: ignore[attr-defined]
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return bool(progress.is_last_batch or progress.current.ready == trainer.num_training_batches)

    def _close_window(self, where: str) -> bool:
        """Flush the open window, counted in ``trainer.global_step`` and logged; True when the optimizer stepped.

        ``where``: ``"step"`` inside ``training_step``, ``"epoch"`` in ``on_train_epoch_end``, ``"fit"``
        in ``on_train_end``.
        """
        if getattr(self, "_gradaccum", None) is None or self._gradaccum.window_micro_batches == 0:
            return False
        stepped = self._gradaccum.flush() if where == "step" else self._flush_counted()
        if stepped:
            if where == "fit":
                self._log_to_loggers()
            else:
                self._log_window(on_step=where == "step")
        return stepped

    def _flush_counted(self) -> bool:
        """``Accumulator.flush()`` outside ``training_step``, its step counted as one taken inside.

        In manual optimization ``trainer.global_step`` counts the steps of the
        ``LightningOptimizer`` through progress hooks that the manual loop binds to it around each
        ``training_step`` (``_ManualOptimization.on_run_start``) and unbinds after; this binds
        them the same way for the flush, then puts back what was bound before.
        """
        trainer = self.trainer  # type: ignore[attr-defined]
        optimizers = trainer.strategy._lightning_optimizers
        bound = [(o._on_before_step, o._on_after_step) for o in optimizers]
        trainer.fit_loop.epoch_loop.manual_optimization.on_run_start()
        try:
            return self.accumulator.flush()
        finally:
            for optimizer, (before, after) in zip(optimizers, bound):
                optimizer._on_before_step, optimizer._on_after_step = before, after

    def _log_window(self, *, on_step: bool) -> None:
        """The last window's record through ``self.log``: a step metric, or an epoch metric in
        ``on_train_epoch_end`` (where Lightning allows no step metric)."""
        values = _logged(self.accumulator.last_record)
        if values:
            self.log_dict(values, on_step=on_step, on_epoch=not on_step)  # type: ignore[attr-defined]

    def _log_to_loggers(self) -> None:
        """The last window's record straight to the trainer's loggers (``on_train_end`` allows no
        ``self.log``), at the step Lightning's own step metrics use."""
        values = _logged(self.accumulator.last_record)
        trainer = self.trainer  # type: ignore[attr-defined]
        if values and trainer.is_global_zero:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)


def _logged(record: StepRecord | None) -> dict[str, float]:
    """What a window's record logs: its items and micro-batches, and the rule's finite numbers."""
    if record is None:
        return {}
    values = {"gradaccum/items": float(record.items), "gradaccum/micro_batches": float(record.micro_batches)}
    values.update({f"gradaccum/{k}": float(v) for k, v in record.info.items()
                   if k in LOGGED and isinstance(v, (int, float)) and math.isfinite(v)})
    return values
