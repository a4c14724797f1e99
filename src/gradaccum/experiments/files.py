"""Files written whole or not at all, with the permissions an ordinary ``open`` would give."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import SettingsError


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a private temporary file next to ``path``; on success rename it over ``path``.

    A crash never leaves a half-written file that a rerun would trust, and concurrent
    writers (parallel tune workers) never share a temporary file. Whatever fails (the
    write, a full disk at close or fsync, the rename), the temporary file is removed and
    the error names ``path``; ``path`` itself is untouched. ``mkstemp`` creates files
    readable by their owner only; the result gets ``0o666 & ~umask`` instead.
    """
    try:
        handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=path.name + ".", suffix=".tmp",
                                             delete=False)
    except OSError as error:
        raise SettingsError(f"cannot write {path}: {error}") from error
    try:
        with handle as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException as error:
        try:
            os.unlink(handle.name)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise SettingsError(f"cannot write {path}: {error}") from error
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_file(path, "w") as f:
        f.write(text)
