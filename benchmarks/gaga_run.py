"""A whole run of the reference GAGA arm against the fixed-batch-32 baseline, one process.

mnist1d (generated offline), MLP 40-256-256-10, Adam, 96,000 training samples per run,
the same data order for every arm (increments of 32 drawn from one seeded shuffle):
  baseline    a plain PyTorch loop, batch 32, lr 0.00589 (the reference's tuned value);
  gaga        Accumulator + GSNR(0.0984, increment=32, max_samples=512, scale="sample"),
              lr 0.00307 (the reference's tuned values);
  gaga-mean   the same with scale="mean" and tau 1.5 (docs/design.md, "GSNR");
  norm-test   Accumulator + NormTest(0.5, increment=32, max_samples=512), lr 0.00307: the
              norm path (per-sample gradient norms, no per-element moments).
Every round runs every arm once, the order rotated; the table gives the median wall time,
the median over rounds of each arm's time over the baseline's in the same round with its
min-max, optimizer steps, the mean effective batch and test accuracy (the same every round:
one seed, deterministic).

    python benchmarks/gaga_run.py [--samples 96000] [--seed 0] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch import nn

from gradaccum import GSNR, NormTest
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


ARMS = {
    "gaga (sample scale, tau 0.0984)": (lambda: GSNR(0.0984, scale="sample"), 0.00307),
    "gaga-mean (mean scale, tau 1.5)": (lambda: GSNR(1.5, scale="mean"), 0.00307),
    "norm-test (theta 0.5)": (lambda: NormTest(0.5, increment=32, max_samples=512), 0.00307),
}
BASELINE = "baseline (batch 32)"


def run_baseline(x, y, samples: int, seed: int) -> tuple[nn.Module, int, float]:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.00589)
    steps = 0
    for xb, yb in increments(x, y, samples, seed):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        steps += 1
    return model, steps, 32.0


def run_arm(name: str, x, y, samples: int, seed: int) -> tuple[nn.Module, int, float]:
    make_rule, lr = ARMS[name]
    torch.manual_seed(seed)
    model = mlp()
    acc = Accumulator(model, torch.optim.Adam(model.parameters(), lr=lr), make_rule())
    acc.monitor.patience = 10**9  # this benchmark reports the batch sizes itself
    for xb, yb in increments(x, y, samples, seed):
        acc.backward(nn.functional.cross_entropy(model(xb), yb), len(yb))
    acc.flush()
    batches = [r.items for r in acc.history]
    return model, len(batches), sum(batches) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    data = load_mnist1d()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    names = [BASELINE, *ARMS]
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, tuple[int, float, float]] = {}
    for r in range(args.rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            t = time.perf_counter()
            run = run_baseline if name == BASELINE else partial(run_arm, name)
            model, steps, batch = run(x, y, args.samples, args.seed)
            times[name].append(time.perf_counter() - t)
            results[name] = (steps, batch, accuracy(model, x_test, y_test))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} samples per run, "
          f"{args.rounds} rounds\n")
    print("| arm | wall s | / baseline [min-max] | optimizer steps | mean effective batch | test accuracy |")
    print("|---|---|---|---|---|---|")
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times[BASELINE])]
        steps, batch, acc_ = results[name]
        print(f"| {name} | {statistics.median(times[name]):.1f} | {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] | {steps} | {batch:.0f} | {acc_:.3f} |")


if __name__ == "__main__":
    main()
