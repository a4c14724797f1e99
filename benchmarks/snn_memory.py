"""The memory proof: one effective batch of 64 through a spiking network, at micro-batch 1, 8, 64.

For each micro-batch size the Accumulator runs the window (FixedSteps(64 // m)); peak
memory is measured in a forked child per setting (gradaccum.torch.measure_peak_memory),
and the three settings' gradients are compared. Prints a Markdown table and writes a
PNG plot.

    python benchmarks/snn_memory.py [--steps 100] [--hidden 512] [--plot docs/snn_memory.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradaccum import FixedSteps  # noqa: E402
from gradaccum.experiments.snn import SpikingClassifier  # noqa: E402
from gradaccum.torch import Accumulator, measure_peak_memory  # noqa: E402

EFFECTIVE = 64


def window_gradient(steps: int, hidden: int, micro: int) -> list[torch.Tensor]:
    """The gradient one window of 64 samples applies, fed as micro-batches of ``micro``."""
    torch.manual_seed(0)
    model = SpikingClassifier(hidden=hidden, steps=steps)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(EFFECTIVE, 40, generator=g) * 2, torch.randint(0, 10, (EFFECTIVE,), generator=g)
    seen: list[torch.Tensor] = []

    class Capture(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            seen.extend(p.grad.detach().clone() for p in self.param_groups[0]["params"])
            return super().step(closure)

    acc = Accumulator(model, Capture(model.parameters(), lr=0.0), FixedSteps(EFFECTIVE // micro))
    for i in range(0, EFFECTIVE, micro):
        acc.backward(nn.functional.cross_entropy(model(x[i:i + micro]), y[i:i + micro]), micro)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="time steps of the spiking network")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--plot", default="docs/snn_memory.png")
    args = parser.parse_args()
    micros = (1, 8, 64)
    window_gradient(args.steps, args.hidden, 8)  # warm up torch's lazy allocations before forking
    peaks = {m: measure_peak_memory(lambda m: window_gradient(args.steps, args.hidden, m), m) for m in micros}
    grads = {m: window_gradient(args.steps, args.hidden, m) for m in micros}
    print(f"spiking classifier 40-{args.hidden}-10, {args.steps} time steps, effective batch {EFFECTIVE}\n")
    print("| micro-batch | micro-batches per window | peak memory, MiB | gradient vs micro-batch 64: max abs diff "
          "/ max abs |")
    print("|---|---|---|---|")
    for m in micros:
        diff = max(float((a - b).abs().max()) for a, b in zip(grads[m], grads[64]))
        scale = max(float(b.abs().max()) for b in grads[64])
        print(f"| {m} | {EFFECTIVE // m} | {peaks[m] / 2**20:.1f} | {diff / scale:.1e} |")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([str(m) for m in micros], [peaks[m] / 2**20 for m in micros])
    ax.set(xlabel="micro-batch (effective batch 64)", ylabel="peak memory of one window, MiB",
           title=f"Spiking network, {args.steps} time steps")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
