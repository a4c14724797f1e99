"""Files written whole or not at all, with the permissions an ordinary ``open`` would give."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a private temporary file next to ``path``; on success rename it over ``path``.

    A crash never leaves a half-written file that a rerun would trust, and concurrent
    writers (parallel tune workers) never share a temporary file. ``mkstemp`` creates
    files readable by their owner only; the result gets ``0o666 & ~umask`` instead.
    """
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=path.name + ".", suffix=".tmp",
                                     delete=False) as f:
        try:
            yield f
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)
    os.replace(f.name, path)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with atomic_file(path, "w") as f:
        f.write(text)
