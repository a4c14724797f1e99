"""A whole run of the reference GAGA arm against the fixed-batch-32 baseline, one process.

mnist1d (generated offline), MLP 40-256-256-10, Adam, 96,000 training samples per run,
the same data order for every arm (increments of 32 drawn from one seeded shuffle):
  baseline    a plain PyTorch loop, batch 32, lr 0.00589 (the reference's tuned value);
  gaga        Accumulator + GSNR(0.0984, increment=32, max_samples=512, scale="sample"),
              lr 0.00307 (the reference's tuned values);
  gaga-mean   the same with scale="mean" and tau 1.5 (docs/design.md, "GSNR").
Prints wall time, its ratio to the baseline, optimizer steps, the mean effective batch
and test accuracy.

    python benchmarks/gaga_run.py [--samples 96000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from gradaccum import GSNR
from gradaccum.experiments.mnist1d_data import load_mnist1d
from gradaccum.torch import Accumulator


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def increments(x: torch.Tensor, y: torch.Tensor, samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    seen = 0
    while seen < samples:
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(order) - 31, 32):
            if seen >= samples:
                return
            idx = order[i:i + 32]
            seen += 32
            yield x[idx], y[idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_mnist1d()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    rows = []

    torch.manual_seed(args.seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.00589)
    t = time.perf_counter()
    steps = 0
    for xb, yb in increments(x, y, args.samples, args.seed):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        steps += 1
    rows.append(("baseline (batch 32)", time.perf_counter() - t, steps, 32.0, accuracy(model, x_test, y_test)))

    for name, rule, lr in (("gaga (sample scale, tau 0.0984)", GSNR(0.0984, scale="sample"), 0.00307),
                           ("gaga-mean (mean scale, tau 1.5)", GSNR(1.5, scale="mean"), 0.00307)):
        torch.manual_seed(args.seed)
        model = mlp()
        acc = Accumulator(model, torch.optim.Adam(model.parameters(), lr=lr), rule)
        acc.monitor.patience = 10**9  # this benchmark reports the batch sizes itself
        t = time.perf_counter()
        for xb, yb in increments(x, y, args.samples, args.seed):
            acc.backward(nn.functional.cross_entropy(model(xb), yb), len(yb))
        acc.flush()
        elapsed = time.perf_counter() - t
        batches = [r.items for r in acc.history]
        rows.append((name, elapsed, len(batches), sum(batches) / len(batches), accuracy(model, x_test, y_test)))

    base = rows[0][1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} samples per run\n")
    print("| arm | wall s | / baseline | optimizer steps | mean effective batch | test accuracy |")
    print("|---|---|---|---|---|---|")
    for name, seconds, steps, batch, acc_ in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / base:.2f}x | {steps} | {batch:.0f} | {acc_:.3f} |")


if __name__ == "__main__":
    main()
