"""mnist1d, generated offline by the mnist1d package's own generator (docs/design.md, "Reference experiment").

``make_dataset`` with the package's default arguments (5000 samples, seed 42) gives
4000 train and 1000 test samples of length 40; the first 3200 train samples train and
the last 800 validate. ``get_dataset`` (which may download) is never called.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files import atomic_file

TRAIN, VALIDATION = 3200, 800


class MNIST1D(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_mnist1d(cache: Path | None = None) -> MNIST1D:
    """The reference splits; cached as ``.npz`` at ``cache`` when given (regenerated if missing)."""
    if cache is not None and cache.exists():
        with np.load(cache) as f:
            return MNIST1D(*(f[k] for k in MNIST1D._fields))
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("mnist1d is not installed: pip install -c constraints.txt -e '.[experiments]'") from error
    data = make_dataset(get_dataset_args())
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    if len(x) != TRAIN + VALIDATION:
        raise ValueError(f"mnist1d generated {len(x)} train samples, expected {TRAIN + VALIDATION}")
    splits = MNIST1D(x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:], data["x_test"].astype(np.float32),
                     data["y_test"].astype(np.int64))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # a private temporary file, then an atomic rename: never a half-written cache that a
        # rerun would trust, and no collision between workers generating it at once
        with atomic_file(cache) as f:
            np.savez(f, **splits._asdict())
    return splits
