"""What the statistics sources cost: the fixed Accumulator against the same windows with the
noise scale measured, side by side in one process.

Every runner closes windows of ``k`` micro-batches: ``FixedSteps(k)``; ``NoiseScalePlanner``
pinned to ``k`` micro-batches (``min_batch = max_batch``) on the micro-batch source; ``NormTest``
pinned likewise (its test still made at every micro-batch) on the micro-batch source; and the
planner on the per-sample source, each over the fixed Accumulator. Beside them a plain
accumulation loop (``loss / k`` backward ``k`` times, ``optimizer.step()``, ``zero_grad``) with
and without ``Monitor(source="micro_batch", accumulation=k)``, the Monitor over the plain
loop, and with only a hook per parameter that takes each added gradient's squared norm (one dot,
read back once a backward): the least any measurement of the micro-batches' own gradients in a
plain loop reads, the Monitor's floor. Rounds interleave the runners (their order rotating),
and each ratio is the median over rounds of the per-round ratio, with the interval between the
25th and 75th percentiles of those per-round ratios. Written as JSON beside the printed table.

    python benchmarks/micro_batch_statistics.py [--rounds 15] [--windows 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch import nn

from gradaccum import FixedSteps, NoiseScalePlanner, NormTest
from gradaccum.torch import Accumulator, Monitor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from _models import GPT, GPTConfig  # noqa: E402  (nanoGPT's model, cut down)
from _rounds import interleaved_seconds  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def mlp() -> nn.Module:
    """The 1.6M-parameter MLP 512-1024-1024-10."""
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def gpt() -> nn.Module:
    return GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=128, dropout=0.0))


CASES = {  # name: (model, micro-batch, k, batch maker, loss)
    "MLP 512-1024-1024-10, micro-batch 64 x 4": (mlp, 64, 4),
    "nanoGPT 2 layers, d 128, T 64, micro-batch 16 x 4": (gpt, 16, 4),
}


def batches(name: str, m: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if name.startswith("MLP"):
        return [(torch.randn(m, 512, generator=g), torch.randint(0, 10, (m,), generator=g)) for _ in range(count)]
    return [(torch.randint(0, 256, (m, 64), generator=g), torch.randint(0, 256, (m, 64), generator=g))
            for _ in range(count)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(model, GPT):
        return model(x, y)[1]
    return nn.functional.cross_entropy(model(x), y)


def runner(make, rule, data):
    torch.manual_seed(0)
    model = make()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-4), rule)

    def run() -> None:
        for x, y in data:
            acc.backward(loss_of(model, x, y), y.numel(), samples=len(x))

    return run


def loop_runner(make, data, k: int, monitored: bool | str):
    """The plain accumulation loop, with the micro-batch Monitor (``True``), with one read of each
    added gradient (``"read_once"``) or with neither."""
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    squares: list[torch.Tensor] = []
    if monitored == "read_once":
        for p in model.parameters():
            p.register_hook(lambda g: squares.append(torch.dot(g.reshape(-1), g.reshape(-1))))
    elif monitored:
        Monitor(model, optimizer, source="micro_batch", accumulation=k)

    def run() -> None:
        for i, (x, y) in enumerate(data):
            (loss_of(model, x, y) / k).backward()
            if squares:
                torch.stack(squares).tolist()
                squares.clear()
            if (i + 1) % k == 0:
                optimizer.step()
                optimizer.zero_grad()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--windows", type=int, default=10, help="windows per timed round")
    parser.add_argument("--out", default="benchmarks/results/micro_batch_statistics.json")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | fixed ms/window | planner, micro-batch source / fixed [IQR] | NormTest, micro-batch source / "
          "fixed [IQR] | planner, per-sample source / fixed [IQR] | Monitor, micro-batch source / plain loop [IQR] | "
          "one read per added gradient / plain loop [IQR] |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for name, (make, m, k) in CASES.items():
        data = batches(name, m, k * args.windows)
        pinned = dict(c=1.0, min_batch=k * m, max_batch=k * m, micro_batch=m)
        runners = [runner(make, FixedSteps(k), data),
                   runner(make, NoiseScalePlanner(**pinned, source="micro_batch"), data),
                   runner(make, NormTest(0.5, min_samples=k * m, max_samples=k * m), data),
                   runner(make, NoiseScalePlanner(**pinned, source="per_sample"), data),
                   loop_runner(make, data, k, monitored=False),
                   loop_runner(make, data, k, monitored=True),
                   loop_runner(make, data, k, monitored="read_once")]
        times = interleaved_seconds(runners, args.rounds, args.windows)
        pairs = {"micro_batch": (1, 0), "norm_test": (2, 0), "per_sample": (3, 0), "monitor": (5, 4),
                 "read_once": (6, 4)}
        row: dict = {"model": name, "fixed_ms_per_window": 1e3 * statistics.median(times[0]),
                     "plain_loop_ms_per_window": 1e3 * statistics.median(times[4]),
                     "rounds": args.rounds, "threads": torch.get_num_threads()}
        cells = []
        for key, (j, base) in pairs.items():
            ratios = [t / f for t, f in zip(times[j], times[base])]
            q = statistics.quantiles(ratios, n=4)
            row[f"{key}_over_{'plain' if key in ('monitor', 'read_once') else 'fixed'}"] = statistics.median(ratios)
            row[f"{key}_iqr"] = [q[0], q[2]]
            cells.append(f"{statistics.median(ratios):.3f}x [{q[0]:.3f}, {q[2]:.3f}]")
        results.append(row)
        print(f"| {name} | {row['fixed_ms_per_window']:.1f} | " + " | ".join(cells) + " |", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"command": " ".join(["python benchmarks/micro_batch_statistics.py", *sys.argv[1:]]),
                   "results": results}, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
