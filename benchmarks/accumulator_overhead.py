"""Accumulator vs the hand-written accumulation loop, side by side in one process.

The hand-written loop is the usual pattern:
    (loss / k).backward(); if (i + 1) % k == 0: opt.step(); opt.zero_grad()
The Accumulator does more per micro-batch (exact item weighting, a finiteness check
that keeps a bad micro-batch out of the window, a record per step), and this script
measures what that costs. Rounds alternate between the two so that machine noise hits
both alike; the ratio of medians is printed as a Markdown table.

    python benchmarks/accumulator_overhead.py [--rounds 15] [--windows 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradaccum import FixedSteps
from gradaccum.torch import Accumulator

CONFIGS = [  # (name, widths, micro-batch, k)
    ("MLP 40-256-256-10 (reference)", (40, 256, 256, 10), 32, 4),
    ("MLP 512-1024-1024-10", (512, 1024, 1024, 10), 64, 4),
    ("MLP 1024-4096-4096-10", (1024, 4096, 4096, 10), 32, 4),
]


def mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def hand_loop(model, opt, batches, k):
    for i, (x, y) in enumerate(batches):
        (nn.functional.cross_entropy(model(x), y) / k).backward()
        if (i + 1) % k == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)


def accumulator_loop(model, acc, batches):
    for x, y in batches:
        acc.backward(nn.functional.cross_entropy(model(x), y), len(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--windows", type=int, default=20, help="optimizer steps per timed round")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | micro-batch x k | hand loop ms/step | Accumulator ms/step | ratio | "
          "Accumulator, nonfinite='skip_window' | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, widths, m, k in CONFIGS:
        batches = [(torch.randn(m, widths[0]), torch.randint(0, widths[-1], (m,))) for _ in range(k * args.windows)]
        runners = []
        model = mlp(widths)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        runners.append(lambda model=model, opt=opt, batches=batches, k=k: hand_loop(model, opt, batches, k))
        for policy in ("raise", "skip_window"):
            model = mlp(widths)
            acc = Accumulator(model, torch.optim.Adam(model.parameters(), lr=1e-4), FixedSteps(k),
                              nonfinite=policy, keep_history=False)
            runners.append(lambda model=model, acc=acc, batches=batches: accumulator_loop(model, acc, batches))
        for run in runners:  # warm-up: allocations, Adam state
            run()
        times: list[list[float]] = [[] for _ in runners]
        for r in range(args.rounds):
            # rotate the order, so that no runner always goes first or last
            for i in range(len(runners)):
                which = (i + r) % len(runners)
                t = time.perf_counter()
                runners[which]()
                times[which].append(time.perf_counter() - t)
        hand, ours, in_place = (statistics.median(t) * 1e3 / args.windows for t in times)
        print(f"| {name} | {m} x {k} | {hand:.2f} | {ours:.2f} | {ours / hand:.3f}x | {in_place:.2f} | "
              f"{in_place / hand:.3f}x |")


if __name__ == "__main__":
    main()
