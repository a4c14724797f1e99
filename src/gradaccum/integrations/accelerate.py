"""Accelerate: the Accumulator over what ``accelerator.prepare`` returned.

Accelerate's own accumulation (``accelerator.accumulate()``) closes a window every
``gradient_accumulation_steps`` micro-batches; here the Accumulator decides (a rule or a
planner) and owns backward, the optimizer step, the scheduler, clipping and the loss scale,
so ``accumulator(accelerator, model, optimizer, rule, scheduler=...)`` unwraps what Accelerate
wrapped around the step:

- the prepared optimizer (``AcceleratedOptimizer``) is replaced by the optimizer it wraps, whose
  step the Accumulator takes (the wrapper would step, and unscale, a second time);
- the prepared scheduler (``AcceleratedScheduler``) by the scheduler it wraps: the wrapper steps
  ``num_processes`` times per optimizer step unless told otherwise, the Accumulator steps the
  scheduler once per window;
- the accelerator's GradScaler (``mixed_precision="fp16"``) is the Accumulator's scaler;
  the prepared model keeps Accelerate's autocast and its DDP wrapper (the Accumulator syncs
  once per window).

Call ``acc.backward(loss, count)`` where the script called ``accelerator.backward(loss)``,
``optimizer.step()``, ``scheduler.step()`` and ``optimizer.zero_grad()``. To checkpoint the
partial window with ``accelerator.save_state``, ``accelerator.register_for_checkpointing(acc)``.
Refused with the reason: an accelerator with ``gradient_accumulation_steps > 1`` (two
accumulators would disagree about windows) and distributed types other than none, multi-CPU
and multi-GPU DDP (DeepSpeed, XLA, Megatron own the backward or the gradient layout;
Accelerate's FSDP runs only on GPUs and is untested here: shard with ``fully_shard`` and use the
Accumulator directly, which supports FSDP2).
"""

from __future__ import annotations

from typing import Any

from ..torch import Accumulator

SUPPORTED = ("NO", "MULTI_CPU", "MULTI_GPU")


def accumulator(accelerator: Any, model: Any, optimizer: Any, rule: Any, *, scheduler: Any = None,
                **kwargs: Any) -> Accumulator:
    """An ``Accumulator`` for a model, optimizer (and scheduler) prepared by ``accelerator``;
    ``kwargs`` go to the Accumulator (``clip_grad_norm``, ``nonfinite``, ``lr_schedule``...)."""
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if steps != 1:
        raise ValueError(f"accelerator: gradient_accumulation_steps={steps}; the Accumulator decides the windows, "
                         "so create the Accelerator with gradient_accumulation_steps=1 (its default)")
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind not in SUPPORTED:
        raise ValueError(f"accelerator: distributed_type {kind} is not supported (the Accumulator runs with "
                         f"{', '.join(SUPPORTED)}: plain or DDP); it owns the backward and the gradient layout")
    if "scaler" in kwargs:
        raise ValueError("scaler: the accelerator's GradScaler is used (mixed_precision='fp16'); do not pass one")
    return Accumulator(model, getattr(optimizer, "optimizer", optimizer), rule,
                       scheduler=getattr(scheduler, "scheduler", scheduler), scaler=accelerator.scaler, **kwargs)
