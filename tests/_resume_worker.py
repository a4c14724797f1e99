"""Run by test_resume.py in fresh processes: train, stop mid-window, save; load, continue.

Usage: python -m tests._resume_worker {full|first|second} DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gradaccum import FixedSteps
from gradaccum.torch import Accumulator

MICRO_BATCHES = 23  # windows of 4: five full windows and three micro-batches of the sixth
STOP_AT = 10  # mid-window: two micro-batches into the third window


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    acc = Accumulator(model, opt, FixedSteps(4), scheduler=sched, clip_grad_norm=1.0)
    return model, opt, sched, acc


def micro_batch(i: int):
    g = torch.Generator().manual_seed(1000 + i)
    n = 3 + i % 5  # uneven sizes
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(model, acc, start: int, stop: int) -> None:
    for i in range(start, stop):
        x, y = micro_batch(i)
        acc.backward(torch.nn.functional.cross_entropy(model(x), y), len(y))


def main(mode: str, out: Path) -> None:
    model, opt, sched, acc = build()
    if mode == "full":
        train(model, acc, 0, MICRO_BATCHES)
        acc.flush()
        torch.save(model.state_dict(), out / "full.pt")
    elif mode == "first":
        train(model, acc, 0, STOP_AT)
        assert acc.window_micro_batches == STOP_AT % 4
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "acc": acc.state_dict()}, out / "ckpt.pt")
    elif mode == "second":
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        acc.load_state_dict(ckpt["acc"])
        train(model, acc, STOP_AT, MICRO_BATCHES)
        acc.flush()
        torch.save(model.state_dict(), out / "resumed.pt")
        torch.save([r.as_dict() for r in acc.history], out / "history.pt")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
