"""Files written whole or not at all, with the permissions an ordinary ``open`` would give
(the library's checkpoints and the experiment's results alike)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a private temporary file next to ``path``; on success rename it over ``path``.

    A crash never leaves a half-written file that a rerun would trust, and concurrent
    writers never share a temporary file. Whatever fails (the write, a full disk at close or
    fsync, the rename), the temporary file is removed and the error propagates; ``path``
    itself is untouched. ``mkstemp`` creates files readable by their owner only; the result
    gets ``0o666 & ~umask`` instead.
    """
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False)
    try:
        with handle as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException:
        try:
            os.unlink(handle.name)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_file(path, "w") as f:
        f.write(text)
