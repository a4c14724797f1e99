"""A small time-stepped spiking classifier: leaky integrate-and-fire neurons, surrogate gradient.

Backpropagation through time keeps every time step's state, so activation memory grows
with time steps x micro-batch; the model is the memory-planning example of docs/design.md
("Memory": a spiking network trains at micro-batch 1 with several accumulation steps).
"""

from __future__ import annotations

import torch
from torch import nn


class _Spike(torch.autograd.Function):
    """Heaviside step forward; fast-sigmoid surrogate derivative backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        return grad / (1.0 + 10.0 * v.abs()) ** 2


class SpikingClassifier(nn.Module):
    """Input current -> LIF hidden layer over ``steps`` time steps -> summed readout."""

    def __init__(self, d_in: int = 40, hidden: int = 512, classes: int = 10, steps: int = 100,
                 beta: float = 0.9) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_in, hidden)
        self.fc_out = nn.Linear(hidden, classes)
        self.steps, self.beta = steps, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self.fc_in(x)
        mem = torch.zeros_like(current)
        logits = torch.zeros((), dtype=current.dtype, device=current.device)  # broadcasts like 0.0
        for _ in range(self.steps):
            mem = self.beta * mem + current
            spikes = _Spike.apply(mem - 1.0)
            mem = mem - spikes  # reset by subtraction
            logits = logits + self.fc_out(spikes)
        return logits / self.steps
