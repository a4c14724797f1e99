"""mnist1d, generated offline by the mnist1d package's own generator (docs/design.md, "Reference experiment").

``make_dataset`` with the package's default arguments (5000 samples, seed 42) gives
4000 train and 1000 test samples of length 40; the first 3200 train samples train and
the last 800 validate. ``get_dataset`` (which may download) is never called.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files import atomic_file

TRAIN, VALIDATION, TEST, LENGTH, CLASSES = 3200, 800, 1000, 40, 10
log = logging.getLogger("gradaccum")


class MNIST1D(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def check_splits(splits: MNIST1D) -> None:
    """Raise ValueError unless ``splits`` have the reference's shapes, dtypes and labels."""
    sizes = {"train": TRAIN, "val": VALIDATION, "test": TEST}
    for part, n in sizes.items():
        x, y = getattr(splits, f"x_{part}"), getattr(splits, f"y_{part}")
        if x.shape != (n, LENGTH) or x.dtype != np.float32 or not np.isfinite(x).all():
            raise ValueError(f"x_{part} must be finite float32 of shape ({n}, {LENGTH}), got {x.dtype} {x.shape}")
        if y.shape != (n,) or y.dtype != np.int64 or y.min() < 0 or y.max() >= CLASSES:
            raise ValueError(f"y_{part} must be int64 labels in [0, {CLASSES}) of shape ({n},)")
        if len(np.unique(y)) < CLASSES:
            raise ValueError(f"y_{part} does not hold all {CLASSES} classes")


def _read_cache(cache: Path) -> MNIST1D | None:
    """The cached splits, or None (with the reason logged) if the file is unusable."""
    try:
        with open(cache, "rb") as raw, np.load(raw, allow_pickle=False) as f:
            splits = MNIST1D(*(np.asarray(f[k]) for k in MNIST1D._fields))
        check_splits(splits)
        return splits
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        log.warning("gradaccum: the mnist1d cache %s is unusable (%s: %s); regenerating it", cache,
                    type(error).__name__, error)
        return None


def load_mnist1d(cache: Path | None = None) -> MNIST1D:
    """The reference splits; cached as ``.npz`` at ``cache`` when given. A missing, truncated,
    garbled or wrong cache (shapes, dtypes, labels) is regenerated, never trusted."""
    if cache is not None and cache.exists():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
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
    check_splits(splits)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            from .errors import SettingsError

            raise SettingsError(f"data_dir: cannot create {cache.parent}: {error}") from error
        # a private temporary file, then an atomic rename: never a half-written cache that a
        # rerun would trust, and no collision between workers generating it at once
        with atomic_file(cache) as f:
            np.savez(f, **splits._asdict())
    return splits
