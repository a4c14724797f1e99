"""Bad arguments raise errors that name the argument; they never touch the open window."""

from __future__ import annotations

import pytest
import torch

from gradaccum import FixedSteps
from gradaccum.torch import Accumulator

from .reference import ce_mean, classification, mlp, take


@pytest.mark.parametrize(
    ("k", "error", "match"),
    [(0, ValueError, "k must be a positive int"), (-3, ValueError, "k must be a positive int"),
     (1.5, TypeError, "k must be a positive int"), (True, TypeError, "k must be a positive int"),
     ("4", TypeError, "k must be a positive int")],
)
def test_fixed_steps_rejects_bad_k(k, error, match) -> None:
    with pytest.raises(error, match=match):
        FixedSteps(k)


def make():
    model = mlp()
    return model, Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(3))


def test_open_window_survives_bad_calls() -> None:
    data = classification(8)
    model, acc = make()
    loss, count = ce_mean(model, take(data, slice(0, 4)))
    acc.backward(loss, count)
    sums = [s.clone() for s in acc._window.sums]
    bad_calls = [
        (lambda: acc.backward(ce_mean(model, data)[0], -2), ValueError, "count must be a non-negative int"),
        (lambda: acc.backward(ce_mean(model, data)[0], 2.5), TypeError, "count must be a non-negative int"),
        (lambda: acc.backward(ce_mean(model, data)[0], True), TypeError, "count must be a non-negative int"),
        (lambda: acc.backward(ce_mean(model, data)[0], torch.tensor([1, 2])), TypeError, "count must be"),
        (lambda: acc.backward(ce_mean(model, data)[0], torch.tensor(2.0)), TypeError, "count must be"),
        (lambda: acc.backward(model(data.x).sum(1), 8), ValueError, "loss must be a scalar"),
        (lambda: acc.backward(ce_mean(model, data)[0].detach(), 8), ValueError, "loss does not require grad"),
        (lambda: acc.backward(1.0, 8), TypeError, "loss must be a torch.Tensor"),
        (lambda: acc.backward(ce_mean(model, data)[0], 8, reduction="avg"), ValueError, "reduction must be one of"),
    ]
    for call, error, match in bad_calls:
        with pytest.raises(error, match=match):
            call()
        assert acc.window_items == 4 and acc.window_micro_batches == 1
        assert all(torch.equal(a, b) for a, b in zip(acc._window.sums, sums))
        assert all(p.grad is None for p in model.parameters())


def test_stray_backward_is_refused() -> None:
    data = classification(4)
    model, acc = make()
    ce_mean(model, data)[0].backward()
    with pytest.raises(RuntimeError, match="did not put there"):
        acc.backward(ce_mean(model, data)[0], 4)


def test_optimizer_must_own_the_model_parameters() -> None:
    model, other = mlp(), mlp()
    with pytest.raises(ValueError, match="optimizer does not own the model's trainable parameters"):
        Accumulator(model, torch.optim.SGD(other.parameters(), lr=0.1), FixedSteps(2))
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="optimizer has no trainable parameters"):
        Accumulator(frozen, torch.optim.SGD(frozen.parameters(), lr=0.1), FixedSteps(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"rule": 4}, TypeError, "rule must be a stopping rule"),
     ({"model": "net"}, TypeError, "model must be a torch.nn.Module"),
     ({"optimizer": object()}, TypeError, "optimizer must be a torch.optim.Optimizer"),
     ({"clip_grad_norm": 0.0}, ValueError, "clip_grad_norm must be a positive finite number"),
     ({"clip_grad_norm": float("nan")}, ValueError, "clip_grad_norm must be a positive finite number"),
     ({"nonfinite": "ignore"}, ValueError, "nonfinite must be one of"),
     ({"scheduler": 3}, TypeError, "scheduler must have a step"),
     ({"scaler": object()}, TypeError, "scaler must be a torch.amp.GradScaler")],
)
def test_constructor_arguments_are_checked(kwargs, error, match) -> None:
    model = mlp()
    args = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "rule": FixedSteps(2)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Accumulator(args.pop("model"), args.pop("optimizer"), args.pop("rule"), **args)


def test_load_state_dict_rejects_mismatched_state() -> None:
    model, acc = make()
    state = acc.state_dict()
    small = torch.nn.Linear(2, 2).double()
    other = Accumulator(small, torch.optim.SGD(small.parameters(), lr=0.1), FixedSteps(2))
    with pytest.raises(ValueError, match="gradient sums"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="state version must be 2"):
        acc.load_state_dict({"version": 99})
