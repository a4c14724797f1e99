"""The cost of measuring with ``gradaccum.torch.Monitor``, side by side in one process.

Competitors, each a training step (forward, backward of the mean loss, Adam step) of the same
MLP on the same batch: ``plain``; ``norms``, with a ``Monitor`` on the norm path (the noise
scale); ``elements``, with a ``Monitor(statistics="elements")`` (the noise scale and GSNR).
Each competitor has its own copy of the model. Every round runs each once per step of a block
of steps, the order rotated; the table gives the median over rounds of each one's time over
plain's in the same round, with its min-max.

    python benchmarks/monitor_overhead.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from gradaccum.torch import Monitor

CONFIGS = [  # (name, widths, batch)
    ("MLP 40-256-256-10, batch 32", (40, 256, 256, 10), 32),
    ("MLP 40-256-256-10, batch 512", (40, 256, 256, 10), 512),
    ("MLP 512-1024-1024-10, batch 256", (512, 1024, 1024, 10), 256),
    ("MLP 1024-4096-4096-10, batch 128", (1024, 4096, 4096, 10), 128),
]


def mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds\n")
    print("| model, batch | plain ms/step | Monitor (norms) / plain | Monitor (elements) / plain |")
    print("|---|---|---|---|")
    for name, widths, batch in CONFIGS:
        torch.manual_seed(0)
        base = mlp(widths)
        x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
        steps = {}
        for kind in ("plain", "norms", "elements"):
            model = copy.deepcopy(base)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            if kind != "plain":
                Monitor(model, opt, statistics=kind)

            def step(model=model, opt=opt, x=x, y=y) -> None:
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            steps[kind] = step
        repeats = {}
        for kind, step in steps.items():
            t = time.perf_counter()
            step()
            repeats[kind] = max(1, int(0.1 / (time.perf_counter() - t)))
        times: dict[str, list[float]] = {k: [] for k in steps}
        names = list(steps)
        for r in range(args.rounds):
            for i in range(len(names)):
                kind = names[(i + r) % len(names)]
                t = time.perf_counter()
                for _ in range(repeats[kind]):
                    steps[kind]()
                times[kind].append((time.perf_counter() - t) / repeats[kind])

        def ratio(kind: str, times: dict[str, list[float]] = times) -> str:
            rs = [a / b for a, b in zip(times[kind], times["plain"])]
            return f"{statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]"

        print(f"| {name} | {statistics.median(times['plain']) * 1e3:.2f} | {ratio('norms')} | {ratio('elements')} |",
              flush=True)


if __name__ == "__main__":
    main()
