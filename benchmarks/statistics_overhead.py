"""Cost of per-sample gradient statistics per increment, side by side in one process.

Competitors, on two increments of the same size (forward + backward of the summed loss):
  plain   the ordinary backward, no statistics;
  ours    PerSampleGradStats: the same backward, hooks, the merge into the moments, and
          the GSNR rule's decision after each increment;
  vmap    torch.func vmap(grad) per-sample gradients, then their sum and sum of squares
          (how the reference GAGA implementation gets them).
Time: medians over rounds, the order rotated each round; ratios to plain. Peak memory:
each competitor runs in a fresh child process that has built only the model and the
data; the peak resident size is reset there (/proc/self/clear_refs) and the child
reports how far it rose during two runs: gradients, activations, and for "ours" the
moments it keeps (mean and M2, two parameter-sized buffers, plus one scratch buffer).

    python benchmarks/statistics_overhead.py [--rounds 7] [--skip-vmap-above 5000000]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradaccum import GSNR, WindowView
from gradaccum.torch import PerSampleGradStats


class Encoder(nn.Module):
    """A small Transformer encoder classifier with an embedding (2 layers, d=64, 32 tokens)."""

    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


CONFIGS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor], int]] = {
    "MLP 40-256-256-10, 32 samples": (lambda: mlp(40, 256, 256, 10), lambda n: torch.randn(n, 40), 32),
    "MLP 40-256-256-10, 512 samples": (lambda: mlp(40, 256, 256, 10), lambda n: torch.randn(n, 40), 512),
    "MLP 512-1024-1024-10, 256 samples": (lambda: mlp(512, 1024, 1024, 10), lambda n: torch.randn(n, 512), 256),
    "MLP 1024-4096-4096-10, 128 samples": (lambda: mlp(1024, 4096, 4096, 10), lambda n: torch.randn(n, 1024), 128),
    "Transformer encoder 2x64, 32 tokens, 32 samples": (Encoder, lambda n: torch.randint(0, 1000, (n, 32)), 32),
}


def make(config: str, which: tuple[str, ...] = ("plain", "ours", "vmap")):
    """The competitors on one increment. "ours" runs on a copy of the model that carries
    the statistics hooks, so "plain" pays nothing for them; a child process that
    measures one competitor builds only what that one needs."""
    torch.manual_seed(0)
    build, inputs, n = CONFIGS[config]
    model = build()
    x, y = inputs(n), torch.randint(0, 10, (n,))
    runners: dict[str, Callable[[], None]] = {}
    if "plain" in which:
        def plain() -> None:
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y, reduction="sum").backward()

        runners["plain"] = plain
    if "ours" in which:
        hooked = copy.deepcopy(model) if len(which) > 1 else model
        stats = PerSampleGradStats(hooked)

        rule = GSNR(1.0, increment=n, max_samples=4 * n)

        def ours() -> None:
            # two increments, as in a window: the second one exercises the merge
            for _ in range(2):
                hooked.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(hooked(x), y, reduction="sum").backward()
                stats.commit()
                rule.decide(WindowView(1, n, stats.moments()))
            stats.reset()

        runners["ours"] = ours
    if "vmap" in which:
        params = dict(model.named_parameters())

        def loss_one(p, xi, yi):
            return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def vmapped() -> None:
            for _ in range(2):
                for g in per_sample(params, x, y).values():
                    g.sum(0), (g * g).sum(0)

        runners["vmap"] = vmapped
    return runners, sum(p.numel() for p in model.parameters())


def peak_memory_child(config: str, name: str) -> float:
    """MiB by which the competitor's run raised the child's peak resident memory."""
    out = subprocess.run([sys.executable, __file__, "--child", config, name], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(config: str, name: str) -> None:
    runners, _ = make(config, (name,))
    with open("/proc/self/statm") as f:
        rss_kib = int(f.read().split()[1]) * resource.getpagesize() // 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    runners[name]()
    runners[name]()
    print(json.dumps({"extra_mib": (_vm_hwm_kib() - rss_kib) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-vmap-above", type=int, default=5_000_000,
                        help="skip vmap for models with more parameters (its memory is samples x parameters)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model, increment | plain ms | ours ms | ours / plain | vmap ms | vmap / ours | "
          "peak +MiB plain | peak +MiB ours | peak +MiB vmap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        runners, n_params = make(config)
        names = ["plain", "ours"] + (["vmap"] if n_params <= args.skip_vmap_above else [])
        repeats = {}
        for name in names:
            t = time.perf_counter()
            runners[name]()  # warm-up, and how many calls make a round of >= 50 ms
            repeats[name] = max(1, int(0.05 / (time.perf_counter() - t)))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for i in range(len(names)):
                name = names[(i + r) % len(names)]
                t = time.perf_counter()
                for _ in range(repeats[name]):
                    runners[name]()
                times[name].append((time.perf_counter() - t) / repeats[name])
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        mem = {name: peak_memory_child(config, name) for name in names}
        vm = f"{med['vmap']:.1f} | {med['vmap'] / med['ours']:.1f}x" if "vmap" in med else "skipped | -"
        vmem = f"{mem['vmap']:.0f}" if "vmap" in mem else "-"
        print(f"| {config} | {med['plain']:.2f} | {med['ours']:.2f} | {med['ours'] / med['plain']:.2f}x | {vm} | "
              f"{mem['plain']:.0f} | {mem['ours']:.0f} | {vmem} |", flush=True)


if __name__ == "__main__":
    main()
