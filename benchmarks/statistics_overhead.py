"""Cost of per-sample gradient statistics per increment, side by side in one process.

Competitors, on two increments of the same size (forward + backward of the summed loss):
  plain   the ordinary backward, no statistics;
  ours    PerSampleGradStats: the same backward, hooks, the merge into the moments, and
          the GSNR rule's decision after each increment (per-element statistics);
  norms   PerSampleGradStats(statistics="norms"): the same backward, per-sample squared norms,
          and the NormTest decision after each increment (the norm path);
  vmap    torch.func vmap(grad) per-sample gradients, then their sum and sum of squares
          (how the reference GAGA implementation gets them).
Time: per round, each competitor's time over plain's in the same round (the order rotated
each round); the table gives the median ratio and its min-max over rounds. Peak memory:
each competitor runs in a fresh child process that has built only the model and the
data; the peak resident size is reset there (/proc/self/clear_refs) and the child
reports how far it rose during two runs: gradients, activations, and for "ours" the
moments it keeps (mean and M2, two parameter-sized buffers, plus one scratch buffer).

    python benchmarks/statistics_overhead.py [--rounds 7] [--skip-vmap-above 5000000] [--foreach] [--only TEXT]

Per-element statistics use the fused kernels (``gradaccum.torch._stats._fused``) from 2^20
elements; ``--foreach`` runs the foreach kernels at every size, for comparison. A child
compiles the kernels before its peak is reset (a one-time cost of the process).
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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradaccum import GSNR, NormTest, WindowView
from gradaccum._core.noise_scale import pooled_terms
from gradaccum.experiments.lm_task import ByteGPT
from gradaccum.torch import PerSampleGradStats
from gradaccum.torch._stats import _fused


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


class ResNetLike(nn.Module):
    """A small ResNet-like CNN with GroupNorm (3x32x32 input, 32 channels, 2 residual blocks)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.GroupNorm(8, width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)) for _ in range(2)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


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
    # the experiment's byte-level GPT: 2 blocks, d=128, 4 heads, 64 tokens, head tied to the embedding
    "nanoGPT-style LM 2x128, 64 tokens, 16 samples": (lambda: ByteGPT(64, 128, 2),
                                                      lambda n: torch.randint(0, 256, (n, 64)), 16),
    "ResNet-like CNN, GroupNorm, 32x32, 32 samples": (ResNetLike, lambda n: torch.randn(n, 3, 32, 32), 32),
}


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed loss: per token for the LM (its targets: the inputs shifted), else per sample."""
    out = model(x)
    if out.dim() == 3:
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
    return F.cross_entropy(out, y, reduction="sum")


def make(config: str, which: tuple[str, ...] = ("plain", "ours", "norms", "vmap")):
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
                loss_of(model, x, y).backward()

        runners["plain"] = plain
    if "ours" in which:
        hooked = copy.deepcopy(model) if len(which) > 1 else model
        stats = PerSampleGradStats(hooked)

        rule = GSNR(1.0, increment=n, max_samples=4 * n)

        def ours() -> None:
            # two increments, as in a window: the second one exercises the merge
            for _ in range(2):
                hooked.zero_grad(set_to_none=True)
                loss_of(hooked, x, y).backward()
                stats.commit()
                rule.decide(WindowView(1, n, stats.moments()))
            stats.reset()

        runners["ours"] = ours
    if "norms" in which:
        normed = copy.deepcopy(model) if len(which) > 1 else model
        norm_stats = PerSampleGradStats(normed, statistics="norms")
        norm_rule = NormTest(0.5, increment=n, max_samples=4 * n)
        norm_params = list(normed.parameters())

        def norms() -> None:
            window: list[torch.Tensor] | None = None  # the window's gradient sum, as the Accumulator keeps it
            for _ in range(2):
                normed.zero_grad(set_to_none=True)
                loss_of(normed, x, y).backward()
                norm_stats.commit()
                grads = [p.grad for p in norm_params]
                if window is None:
                    window = grads
                else:
                    torch._foreach_add_(window, grads)
                norm_rule.decide(WindowView(1, n, pooled_terms(norm_stats.norm_sums(window))))
            norm_stats.reset()

        runners["norms"] = norms
    if "vmap" in which:
        params = dict(model.named_parameters())

        def loss_one(p, xi, yi):
            return loss_of(lambda z: functional_call(model, p, (z,)), xi.unsqueeze(0), yi.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def vmapped() -> None:
            for _ in range(2):
                for g in per_sample(params, x, y).values():
                    g.sum(0), (g * g).sum(0)

        runners["vmap"] = vmapped
    return runners, sum(p.numel() for p in model.parameters())


def peak_memory_child(config: str, name: str, foreach: bool) -> float:
    """MiB by which the competitor's run raised the child's peak resident memory."""
    out = subprocess.run([sys.executable, __file__, "--child", config, name, *(["--foreach"] if foreach else [])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(config: str, name: str, foreach: bool) -> None:
    runners, _ = make(config, (name,))
    if not foreach:
        # compile the fused kernels now: a process's one-time cost
        _fused.Kernels().for_operands([torch.zeros(_fused.FUSED_FROM)])
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
    parser.add_argument("--foreach", action="store_true",
                        help="per-element statistics on the foreach kernels at every size (not the fused ones)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the models whose row name contains TEXT (repeatable)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.foreach:
        _fused.FUSED_FROM = 1 << 62
    if args.child:
        child(*args.child, args.foreach)
        return
    kernels = "foreach kernels" if args.foreach else f"fused kernels from {_fused.FUSED_FROM} elements"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, {kernels}\n")
    print("Ratios: median over rounds [min-max]; vmap / ours and vmap / norms are vmap's time over ours.\n")
    print("| model, increment | plain ms | ours / plain | norms / plain | vmap / ours | vmap / norms | "
          "peak +MiB plain | ours | norms | vmap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    configs = [c for c in CONFIGS if not args.only or any(text in c for text in args.only)]
    if not configs:
        parser.error(f"--only: no model's row name contains {' or '.join(map(repr, args.only))}; "
                     f"the rows are: {', '.join(CONFIGS)}")
    for config in configs:
        runners, n_params = make(config)
        names = ["plain", "ours", "norms"] + (["vmap"] if n_params <= args.skip_vmap_above else [])
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

        def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> str:
            if a not in times:
                return "skipped"
            rs = [x / y for x, y in zip(times[a], times[b])]
            return f"{statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]"

        mem = {name: peak_memory_child(config, name, args.foreach) for name in names}
        vmem = f"{mem['vmap']:.0f}" if "vmap" in mem else "-"
        print(f"| {config} | {statistics.median(times['plain']) * 1e3:.2f} | {ratio('ours', 'plain')} | "
              f"{ratio('norms', 'plain')} | {ratio('vmap', 'ours')} | {ratio('vmap', 'norms')} | "
              f"{mem['plain']:.0f} | {mem['ours']:.0f} | {mem['norms']:.0f} | {vmem} |", flush=True)


if __name__ == "__main__":
    main()
