"""The rows a monitor records, one per optimizer step, with the noise scale's moving average.

Framework-agnostic: ``gradaccum.torch.Monitor`` fills it from its hooks, and a JAX loop from
``gradaccum.jax.noise_value_and_grad``'s statistics. Each row holds ``step``, ``samples``,
``trace`` and ``squared_norm`` (one batch's unbiased ``tr(Sigma)`` and ``|G|^2``, in the units
of the per-sample gradients the caller measured: the torch Monitor's are per-sample-mean units,
see ``gradaccum.torch.Monitor``), ``noise_scale`` (their ratio: noisy, and infinite when
``|G|^2 <= 0``), ``noise_scale_ema`` (the ratio of their exponential moving averages, the
number to read, updated in O(1) per step) and whatever else the caller adds (GSNR, per-layer
noise scales).

A row whose ``trace`` or ``squared_norm`` is NaN or infinite (an overflowing backward) keeps its
own values, and its ``noise_scale`` is NaN; its terms stay out of the moving averages, which go
on from the finite rows (one bad step must not make the average infinite or 0 for good).

Rows go to ``rows``, to an optional CSV file and to an optional sink. The CSV holds every
column any row had, NaN where a row has none (a column first seen in a later row, such as a
per-layer noise scale that needs two samples, rewrites the file whole with the wider header);
rows are appended and flushed one by one, and a row that cannot be written whole is cut.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._files import atomic_file
from .noise_scale import NoiseScaleEMA, averaged_noise_scale, noise_scale


class MonitorLog:
    """Rows of measured statistics; see the module docstring.

    Args:
      csv: optional path of a CSV file, checked here (a file in a writable directory) and
        written from the first row on.
      decay: the weight of the past in the moving averages (``NoiseScaleEMA``).
      sink: optional callable given every row (TensorBoard, a logger).
    """

    def __init__(self, csv: str | os.PathLike[str] | None = None, decay: float = 0.9,
                 sink: Callable[[dict[str, float]], None] | None = None) -> None:
        self._average = NoiseScaleEMA(decay)  # validated
        self.decay = self._average.decay
        self._path = None if csv is None else _checked_path(csv)
        if sink is not None and not callable(sink):
            raise TypeError(f"sink must be a callable taking a row, got {type(sink).__name__}")
        self.rows: list[dict[str, float]] = []
        self._sink = sink
        self._file: Any = None
        self._columns: list[str] = []
        self._closed = False
        self._ema: tuple[float, ...] = (0.0, 0.0, 0.0)  # trace, squared norm, weight (NoiseScaleEMA.update)

    def record(self, samples: float, trace: float, squared_norm: float, *, step: int | None = None,
               **extra: float) -> dict[str, float]:
        """Add one step's row (``step``: its index, by default the number of rows so far).

        A batch of fewer than 2 samples has no terms (NaN); a non-finite term is kept in the
        row and left out of the averages. If the CSV cannot be written, nothing is recorded.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        samples, trace, squared_norm = float(samples), float(trace), float(squared_norm)
        if not samples >= 2:
            trace = squared_norm = math.nan
        finite = math.isfinite(trace) and math.isfinite(squared_norm)
        ema = self._average.update(self._ema, (trace, squared_norm, 1.0)) if finite else self._ema
        row = {"step": float(len(self.rows) if step is None else step), "samples": samples, "trace": trace,
               "squared_norm": squared_norm, "noise_scale": noise_scale(trace, squared_norm) if finite else math.nan,
               "noise_scale_ema": averaged_noise_scale(*ema),
               **{k: float(v) for k, v in extra.items()}}
        self._write(row)  # first: a row the file refuses is not recorded
        self._ema = ema
        self.rows.append(row)
        if self._sink is not None:
            self._sink(row)
        return row

    def _write(self, row: dict[str, float]) -> None:
        if self._path is None:
            return
        if self._closed:
            raise ValueError(f"MonitorLog: {self._path} was closed (close()); record no rows after closing")
        new = [k for k in row if k not in self._columns]
        if self._file is None or new:
            self._rewrite([*self._columns, *new], row)
            return
        position = self._file.tell()
        try:
            _writer(self._file, self._columns).writerow(row)
            self._file.flush()
        except BaseException:
            self._cut(position)
            raise

    def _rewrite(self, columns: list[str], row: dict[str, float]) -> None:
        """The whole file, every row so far and ``row`` under ``columns``, replacing the old one
        in one rename (a failure leaves the old file as it was)."""
        path = self._path
        assert path is not None
        text = io.StringIO(newline="")
        writer = _writer(text, columns)
        writer.writeheader()
        writer.writerows([*self.rows, row])
        try:
            with atomic_file(path, "wb") as f:
                f.write(text.getvalue().encode())
            if self._file is not None:
                self._file.close()
            self._file = open(path, "a", newline="")
        except OSError as error:
            self._file = None  # the next row writes the whole file again
            raise ValueError(f"csv: cannot write {path}: {error.strerror or error}") from error
        self._columns = columns

    def _cut(self, position: int) -> None:
        """Remove a row written in part (a full disk), so the file holds whole rows only."""
        try:
            self._file.seek(position)
            self._file.truncate()
        except OSError:
            pass

    def close(self) -> None:
        """Close the CSV file (no rows may be recorded to it afterwards)."""
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


def _writer(f: Any, columns: list[str]) -> csv.DictWriter[str]:
    return csv.DictWriter(f, fieldnames=columns, restval="nan")


def _checked_path(value: Any) -> Path:
    """``value`` as the path of a CSV file that can be written, or a ValueError naming ``csv``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"csv must be a file path (str or os.PathLike), got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"csv must name a file, got {value!r}; pass a path such as 'noise.csv', or None for no file")
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"csv: {path} is a directory; name a file in it, such as {path / 'noise.csv'}")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"csv: the directory of {path} does not exist; create {parent} first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"csv: {path} cannot be written (permissions); choose another path")
    return path
