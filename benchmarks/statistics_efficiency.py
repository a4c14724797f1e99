"""How many windows each statistics source needs: bias, spread and the windows for B_simple.

Linear regression at fixed parameters has a closed-form noise scale: loss ``(x . w - y)^2 / 2``,
``y = x . w* + sigma eps``, ``delta = w - w*``; for ``x ~ N(0, L)``, ``G = L delta`` and
``tr(Sigma) = (delta' L delta + sigma^2) tr(L) + |L delta|^2``. Each source measures windows of
``k`` micro-batches of ``b`` samples through the Accumulator (lr 0): the per-window terms'
mean against the truth (bias, in standard errors), their standard deviation per window, and
the windows an average needs for its ``B_simple = mean(trace) / mean(|G|^2)`` to be within 20 %
at two standard errors (delta method: ``ceil((2 s / 0.2)^2)`` with ``s`` the per-window
relative spread of the ratio). Isotropic (``L = I``) and anisotropic inputs.

    python benchmarks/statistics_efficiency.py [--windows 400] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

from gradaccum import Decision, WindowView
from gradaccum.torch import Accumulator

D, B, SIGMA = 16, 4, 0.5


class Record:
    needs_statistics = True
    statistics = "norms"

    def __init__(self, k: int, source: str) -> None:
        self.k, self.source = k, source
        self.seen: list[tuple[float, float]] = []

    def decide(self, window: WindowView) -> Decision:
        if window.micro_batches >= self.k:
            self.seen.append((window.statistics.trace, window.statistics.squared_norm))
            return Decision(True, {})
        return Decision(False, {})


def measure(k: int, source: str, scales: np.ndarray, windows: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 1, bias=False).double()
    delta = torch.linspace(-0.4, 0.6, D, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(delta)  # w* = 0
    rule = Record(k, source)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor(scales)
    for _ in range(windows * k):
        x = torch.randn(B, D, generator=g, dtype=torch.float64) * scale
        y = SIGMA * torch.randn(B, generator=g, dtype=torch.float64)
        acc.backward(0.5 * ((model(x).squeeze(1) - y) ** 2).mean(), B)
    if source == "per_sample":
        acc.stats.remove()
    return np.array(rule.seen)


def truth(scales: np.ndarray) -> tuple[float, float]:
    delta = np.linspace(-0.4, 0.6, D)
    cov = np.diag(scales**2)
    return float((delta @ cov @ delta + SIGMA**2) * np.trace(cov) + np.sum((cov @ delta) ** 2)), \
        float(np.sum((cov @ delta) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--out", default="benchmarks/results/statistics_efficiency.json")
    args = parser.parse_args()
    rows = []
    print("| inputs | k | source | trace bias (SE) | |G|^2 bias (SE) | sd of trace / truth | "
          "sd of |G|^2 / truth | windows for B_simple within 20 % |")
    print("|---|---|---|---|---|---|---|---|")
    for inputs, scales in (("isotropic", np.ones(D)), ("anisotropic", np.linspace(0.3, 2.0, D))):
        t_true, g_true = truth(scales)
        for k in (2, 4, 8, 32):
            for source in ("micro_batch", "per_sample"):
                seen = measure(k, source, scales, args.windows, seed=k)
                t, g = seen[:, 0], seen[:, 1]
                n = len(seen)
                bias = [(v.mean() - want) / (v.std(ddof=1) / math.sqrt(n)) for v, want in ((t, t_true), (g, g_true))]
                # per-window spread of the ratio of averages (delta method)
                cov = np.cov(t / t_true, g / g_true)
                spread = math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))
                needed = math.ceil((2 * spread / 0.2) ** 2)
                row = {"inputs": inputs, "k": k, "samples_per_micro_batch": B, "source": source, "windows": n,
                       "trace_bias_se": bias[0], "squared_norm_bias_se": bias[1],
                       "trace_sd_relative": float(t.std(ddof=1) / t_true),
                       "squared_norm_sd_relative": float(g.std(ddof=1) / g_true),
                       "windows_for_b_simple_within_20pct": needed, "true_b_simple": t_true / g_true}
                rows.append(row)
                print(f"| {inputs} | {k} | {source} | {bias[0]:+.2f} | {bias[1]:+.2f} | {row['trace_sd_relative']:.3f} "
                      f"| {row['squared_norm_sd_relative']:.3f} | {needed} |", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"command": "python benchmarks/statistics_efficiency.py", "dim": D, "samples_per_micro_batch": B,
                   "sigma": SIGMA, "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
