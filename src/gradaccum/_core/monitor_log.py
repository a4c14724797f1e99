"""The rows a monitor records, one per optimizer step, with the noise scale's moving average.

Framework-agnostic: ``gradaccum.torch.Monitor`` fills it from its hooks, and a JAX loop from
``gradaccum.jax.noise_value_and_grad``'s statistics. Each row holds ``step``, ``samples``,
``trace`` and ``squared_norm`` (one batch's unbiased ``tr(Sigma)`` and ``|G|^2``),
``noise_scale`` (their ratio: noisy, and infinite when ``|G|^2 <= 0``), ``noise_scale_ema``
(the ratio of their exponential moving averages, the number to read, updated in O(1) per step)
and whatever else the caller adds (GSNR, per-layer noise scales). Rows go to ``rows``, to an
optional CSV file (flushed after each row, so a crash leaves whole rows) and to an optional sink.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Callable

from .noise_scale import NoiseScaleEMA, noise_scale


class MonitorLog:
    """Rows of measured statistics; see the module docstring.

    Args:
      csv: optional path of a CSV file (its columns: the first row's keys).
      decay: the weight of the past in the moving averages (``NoiseScaleEMA``).
      sink: optional callable given every row (TensorBoard, a logger).
    """

    def __init__(self, csv: str | Path | None = None, decay: float = 0.9,
                 sink: Callable[[dict[str, float]], None] | None = None) -> None:
        self.decay = NoiseScaleEMA(decay).decay  # validated
        self.rows: list[dict[str, float]] = []
        self._path = None if csv is None else Path(csv)
        self._sink = sink
        self._file: Any = None
        self._writer: Any = None
        self._ema = (0.0, 0.0, 0.0)  # trace, squared norm, weight

    def record(self, samples: float, trace: float, squared_norm: float, **extra: float) -> dict[str, float]:
        """Add one step's row; a batch of fewer than 2 samples (or a non-finite trace) has no
        terms and leaves the averages as they were."""
        samples, trace, squared_norm = float(samples), float(trace), float(squared_norm)
        if samples < 2 or not math.isfinite(trace):
            trace = squared_norm = math.nan
        else:
            t, g, w = self._ema
            d = self.decay
            self._ema = (d * t + (1 - d) * trace, d * g + (1 - d) * squared_norm, d * w + (1 - d))
        t, g, w = self._ema
        row = {"step": float(len(self.rows)), "samples": samples, "trace": trace, "squared_norm": squared_norm,
               "noise_scale": math.nan if math.isnan(trace) else noise_scale(trace, squared_norm),
               "noise_scale_ema": math.nan if w == 0 else noise_scale(t / w, g / w),
               **{k: float(v) for k, v in extra.items()}}
        self.rows.append(row)
        self._write(row)
        if self._sink is not None:
            self._sink(row)
        return row

    def _write(self, row: dict[str, float]) -> None:
        if self._path is None:
            return
        if self._writer is None:
            self._file = open(self._path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(row))
            self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
