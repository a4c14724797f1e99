"""What the examples share: an offline byte-level corpus, the command line and the result lines.

The corpus is the Python standard library's own source (the ``.py`` files next to ``os.py``),
read as bytes: a vocabulary of 256, nothing to download. A *document* is one paragraph of a
source file (the text between blank lines: a function, a class header, a block of imports);
documents are joined by the byte ``EOT`` (0, which no source file holds), as nanoGPT's data
preparation joins documents with GPT-2's end-of-text token. This module imports neither torch
nor JAX.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from collections.abc import Iterable

import numpy as np

from gradaccum import NoiseScaleEMA

EOT = 0  # end of text: joins documents, pads rows
VOCAB = 256
MODES = ("fixed", "planned", "monitor")
CHECK_WINDOWS = 3  # --check compares the weights after this many fixed windows


def source_files() -> list[str]:
    """The standard library's top-level ``.py`` files, sorted (the same order on every run)."""
    return sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))


def documents(max_bytes: int | None = None) -> list[bytes]:
    """The corpus's documents (paragraphs of the sources), in order, up to ``max_bytes`` in all."""
    out: list[bytes] = []
    total = 0
    for path in source_files():
        with open(path, "rb") as f:
            text = f.read().replace(b"\r\n", b"\n")
        for paragraph in re.split(rb"\n\s*\n", text):
            if paragraph.strip():
                out.append(paragraph)
                total += len(paragraph) + 1
                if max_bytes is not None and total >= max_bytes:
                    return out
    return out


def token_stream(max_bytes: int | None = None) -> np.ndarray:
    """The documents joined by ``EOT`` as one array of uint8 tokens (what nanoGPT memory-maps)."""
    return np.frombuffer(bytes([EOT]).join(documents(max_bytes)) + bytes([EOT]), dtype=np.uint8)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every example takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--mode", choices=MODES, default="fixed",
                   help="fixed: FixedSteps(k) windows; planned: NoiseScalePlanner windows; monitor: the unchanged "
                        "loop, measured only")
    p.add_argument("--size", choices=("tiny", "real"), default="tiny",
                   help="tiny: a few seconds on a CPU (the default); real: the original script's scale")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="the parameters' dtype (default float32; float64 with --check)")
    p.add_argument("--check", action="store_true",
                   help=f"run {CHECK_WINDOWS} fixed windows in float64 and compare the weights with a full-batch "
                        "float64 reference computed here (one big batch per window); exit 1 if they differ")
    return p


def checked_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``--check`` runs fixed windows in float64 and refuses another mode or dtype."""
    args = p.parse_args(argv)
    if args.check:
        if args.mode != "fixed":
            p.error(f"--check compares fixed windows with the full batch; drop --mode {args.mode}")
        if args.dtype == "float32":
            p.error("--check runs in float64; drop --dtype float32")
        args.dtype = "float64"
    elif args.dtype is None:
        args.dtype = "float32"
    return args


def print_noise_scale(value: float, source: str) -> None:
    """The line the examples end a planned or monitored run with: ``noise_scale=<B_simple>``.

    The value is the ratio of the moving averages of ``tr(Sigma)`` and ``|G|^2``; ``inf`` when the
    averaged ``|G|^2`` is not positive (no signal measured yet), ``nan`` only if nothing was measured.
    """
    print(f"noise_scale={value:.6g} ({source})")


def report_planned(history: list, decay: float) -> None:
    """Print a planned run's windows and the noise scale its records measured (``StepRecord``s
    whose ``info`` holds the window's ``trace`` and ``squared_norm``), averaged as the planner does."""
    terms = [(r.info["trace"], r.info["squared_norm"]) for r in history if "trace" in r.info]
    print(f"windows (micro-batches): {[r.micro_batches for r in history]}")
    value = NoiseScaleEMA(decay).estimate(terms)
    print_noise_scale(value, f"NoiseScalePlanner, moving average over {len(terms)} windows")


def report_monitor(rows: list[dict[str, float]], source: str = "Monitor") -> None:
    """Print the noise scale a Monitor (or a ``MonitorLog``) measured: its last moving average."""
    print_noise_scale(rows[-1]["noise_scale_ema"], f"{source}, moving average over {len(rows)} steps")


def max_difference(a: Iterable, b: Iterable) -> float:
    """The largest absolute difference between two models' weights: torch parameters or JAX arrays."""
    def host(x):
        return np.asarray(x.detach() if hasattr(x, "detach") else x)

    return max(float(np.abs(host(x) - host(y)).max()) for x, y in zip(a, b, strict=True))


def report_check(difference: float, tolerance: float, windows: int) -> None:
    """Print the check's result and exit 1 when the windows do not equal the full batch."""
    verdict = "ok" if difference <= tolerance else "FAILED"
    print(f"check: {windows} windows against the full batch, max |w - w_ref| = {difference:.3e} "
          f"(tolerance {tolerance:.0e}) {verdict}")
    if not difference <= tolerance:  # NaN fails too
        sys.exit(1)

