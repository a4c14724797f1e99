"""Checks of the PyTorch objects users hand to the Accumulator."""

from __future__ import annotations

import numbers
from typing import Any

import torch


def check_count(count: Any) -> int:
    """Return the item count of a micro-batch as an int >= 0.

    Accepts a Python or NumPy integer or an integer 0-d tensor (for example
    ``(labels != -100).sum()``). 0 is a micro-batch with no items (every label ignored):
    it adds nothing but its place in the window's length.
    """
    if type(count) is int and count >= 0:  # the common case, without the ABC checks below
        return count
    if isinstance(count, torch.Tensor):
        if count.numel() != 1 or count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
            raise TypeError(
                f"count must be a non-negative int or a one-element integer tensor, got a tensor of shape "
                f"{tuple(count.shape)} and dtype {count.dtype}"
            )
        count = int(count.item())
    elif isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be a non-negative int (items in this micro-batch), got {count!r}")
    if count < 0:
        raise ValueError(f"count must be a non-negative int (items in this micro-batch), got {count}")
    return int(count)


def check_loss(loss: Any) -> torch.Tensor:
    """Return ``loss`` if it is a one-element tensor that autograd can differentiate."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar (the mean loss of the micro-batch), got shape {tuple(loss.shape)}; "
            "reduce it with .mean() (or .sum() and reduction='sum')"
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad: it was computed under torch.no_grad(), detached, "
            "or from a model with no trainable parameters"
        )
    if not loss.is_floating_point():
        raise TypeError(f"loss must be a floating-point tensor, got dtype {loss.dtype}")
    return loss


def tracked_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters whose gradients the Accumulator manages, in optimizer order: every
    parameter the optimizer holds, frozen ones too (a parameter unfrozen later is then
    averaged like the others instead of keeping a ``.grad`` no one clears).

    Every trainable parameter of ``model`` must belong to ``optimizer``: otherwise it
    would receive gradients that no step ever consumes (typically an optimizer built
    for another instance of the model).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    params: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"optimizer does not own the model's trainable parameters ({len(missing)} missing: {shown}); "
            "build the optimizer from this model's parameters, or set requires_grad=False on frozen ones"
        )
    if not any(p.requires_grad for p in params):
        raise ValueError("optimizer has no trainable parameters (all have requires_grad=False)")
    return params


def check_model(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Refuse, by name, what the Accumulator cannot manage: gradients left from before it
    existed, sparse gradients, parameters on the meta device."""
    names = {id(p): n for n, p in model.named_parameters()}
    stale = [names.get(id(p), "?") for p in params if p.grad is not None]
    if stale:
        raise ValueError(
            f"model parameters already hold gradients ({', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}) "
            "from a backward before the Accumulator was built (a memory probe such as find_micro_batch_size?): "
            "they belong to no window. Clear them with optimizer.zero_grad(set_to_none=True) first")
    meta = [names.get(id(p), "?") for p in params if p.is_meta]
    if meta:
        raise ValueError(f"parameters on the meta device ({', '.join(meta[:3])}) hold no values: materialize the "
                         "model first (model.to_empty(device=...) and initialise it)")
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse:
            raise ValueError(f"{name or type(module).__name__}: sparse=True gives sparse gradients, which the "
                             "Accumulator does not accumulate; use sparse=False")
