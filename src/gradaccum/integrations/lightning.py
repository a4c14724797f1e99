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
- each window's record goes to ``self.log`` (``gradaccum/items``, ``gradaccum/micro_batches``
  and the rule's numbers: ``gsnr``, ``noise_scale``...), on the step that closed it;
- the partial window is saved in Lightning's checkpoints (``on_save_checkpoint``) and restored
  when a fit resumes from one (``ckpt_path=``).

With a statistics rule or planner, call the module itself (``self(x)``, its ``forward``) in
``training_step``: the statistics hook the model's forward to count samples and to tell
per-sample layers from broadcast ones.

Refused with the reason: automatic optimization (Lightning would step the optimizer itself),
``precision="16-mixed"`` (Lightning's GradScaler steps through the ``LightningOptimizer``, the
Accumulator would scale a second time; ``bf16-mixed`` and 32/64-bit work), and more than one
optimizer.
"""

from __future__ import annotations

import math
from typing import Any

from ..torch import Accumulator

LOGGED = ("gsnr", "norm_test", "noise_scale", "planned")


class Accumulating:
    """Mixin for a ``LightningModule`` (``class Module(Accumulating, L.LightningModule)``)."""

    accumulation_kwargs: dict[str, Any] = {}
    """Keyword arguments of the Accumulator (``clip_grad_norm``, ``nonfinite``, ``lr_schedule``...)."""

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
        """``Accumulator.backward(loss, count, ...)``; logs the window's record when it closes."""
        stepped = self.accumulator.backward(loss, count, **kwargs)
        record = self.accumulator.last_record
        if stepped and record is not None:
            values = {"gradaccum/items": float(record.items), "gradaccum/micro_batches": float(record.micro_batches)}
            values.update({f"gradaccum/{k}": float(v) for k, v in record.info.items()
                           if k in LOGGED and isinstance(v, (int, float)) and math.isfinite(v)})
            self.log_dict(values, on_step=True, on_epoch=False)  # type: ignore[attr-defined]
        return stepped

    def on_train_start(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if self.automatic_optimization:  # type: ignore[attr-defined]
            raise ValueError("automatic_optimization: set self.automatic_optimization = False in __init__; the "
                             "Accumulator steps the optimizer when its rule closes a window")
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
        pending = getattr(self, "_gradaccum_pending", None)
        if pending is not None:
            self._gradaccum.load_state_dict(pending)
            self._gradaccum_pending = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if getattr(self, "_gradaccum", None) is not None:
            checkpoint["gradaccum"] = self._gradaccum.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._gradaccum_pending = checkpoint.get("gradaccum")
