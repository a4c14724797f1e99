"""Files written whole or not at all (``gradaccum._files``), a failure to write reported as a
``SettingsError`` naming the file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .. import _files
from .errors import SettingsError


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """``gradaccum._files.atomic_file``; an OSError (the temporary file, the write, a full disk,
    the rename) becomes a ``SettingsError`` naming ``path``."""
    try:
        with _files.atomic_file(path, mode) as f:
            yield f
    except OSError as error:
        raise SettingsError(f"cannot write {path}: {error}") from error


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_file(path, "w") as f:
        f.write(text)
