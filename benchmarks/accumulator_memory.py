"""Peak memory of a window through the Accumulator, by rule, against the hand-written loop.

Each competitor runs in fresh child processes (the median of ``--repeats``): build the model and
the data, reset the peak resident size (``/proc/self/clear_refs``), run two windows of two
increments, and report how far the peak rose above the resident size before the run (MiB). The hand-written loop is
``loss.backward()`` per increment and one SGD step per window. Every child compiles the
per-element path's fused kernels before the reset (a one-time cost of the process, not of the
window).

    .venv/bin/python benchmarks/accumulator_memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch
from torch import nn

from gradaccum import GSNR, FixedSteps, NormTest
from gradaccum.torch import Accumulator
from gradaccum.torch._stats import _fused

COMPETITORS = ("hand loop", "FixedSteps", "GSNR (per-element)", "NormTest (norms)")


def model_and_data(width: int, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return model, torch.randn(n, 512), torch.randint(0, 10, (n,))


def run(name: str, width: int, n: int) -> None:
    model, x, y = model_and_data(width, n)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rules = {"FixedSteps": FixedSteps(2), "GSNR (per-element)": GSNR(1e9, increment=n, max_samples=2 * n),
             "NormTest (norms)": NormTest(1e-9, increment=n, max_samples=2 * n)}
    acc = None if name == "hand loop" else Accumulator(model, optimizer, rules[name])
    # compile the fused kernels now: a process's one-time cost
    _fused.Kernels().for_operands([torch.zeros(_fused.FUSED_FROM)])
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    for _ in range(2):
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            if acc is None:
                (loss / 2).backward()
            else:
                acc.backward(loss, n)
        if acc is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"extra_mib": peak - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024, help="hidden width (1024: the 1.6M-parameter MLP)")
    parser.add_argument("--samples", type=int, default=256, help="samples per increment")
    parser.add_argument("--repeats", type=int, default=5, help="child processes per competitor (the median)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.child, args.width, args.samples)
        return
    model, _, _ = model_and_data(args.width, 1)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"MLP 512-{args.width}-{args.width}-10 ({size:.1f} MiB of parameters), "
          f"{args.samples} samples per increment\n")
    print("| competitor | peak +MiB | / hand loop |\n|---|---|---|")
    base = None
    for name in COMPETITORS:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", name, "--width", str(args.width),
                                  "--samples", str(args.samples)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"])
        extra = statistics.median(runs)
        base = base or extra
        print(f"| {name} | {extra:.0f} | {extra / base:.2f}x |")


if __name__ == "__main__":
    main()
