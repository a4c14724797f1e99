"""``gradaccum plot-monitor``: draw what a ``Monitor`` wrote (noise scale, GSNR) per step."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .errors import SettingsError  # noqa: E402
from .files import atomic_file  # noqa: E402

REQUIRED = ("step", "noise_scale", "noise_scale_ema")


def read_monitor_csv(path: Path) -> dict[str, list[float]]:
    """The columns of a Monitor CSV as floats; a file that is not one raises SettingsError naming it."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise SettingsError(f"cannot read {path}: {error}") from error
    if not rows or any(k not in rows[0] for k in REQUIRED):
        raise SettingsError(f"{path} is not a Monitor CSV: it needs a header with {', '.join(REQUIRED)} and rows")
    try:
        return {k: [float(r[k]) for r in rows] for k in rows[0]}
    except (TypeError, ValueError) as error:
        raise SettingsError(f"{path}: a value is not a number ({error})") from error


def plot_monitor(path: Path, out: Path) -> Path:
    """Write ``out`` (PNG): the noise scale per step and its moving average (log scale), and the
    GSNR on both scales where the CSV has them. Steps whose value is not finite or positive
    (one batch's ``|G|^2`` can be <= 0) are left out of the log plot."""
    columns = read_monitor_csv(path)
    gsnr = [k for k in ("gsnr_sample", "gsnr_mean") if k in columns]
    fig, axes = plt.subplots(1 + bool(gsnr), 1, figsize=(7, 3.2 * (1 + bool(gsnr))), squeeze=False)
    ax = axes[0][0]
    for key, style in (("noise_scale", dict(alpha=0.35, lw=1)), ("noise_scale_ema", dict(lw=2))):
        points = [(s, v) for s, v in zip(columns["step"], columns[key]) if math.isfinite(v) and v > 0]
        if points:
            ax.plot(*zip(*points), label=key, **style)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("B_simple (samples)")
    ax.legend()
    for key in gsnr:
        axes[1][0].plot(columns["step"], columns[key], label=key)
    if gsnr:
        axes[1][0].set_xlabel("optimizer step")
        axes[1][0].set_ylabel("mean GSNR")
        axes[1][0].legend()
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out
