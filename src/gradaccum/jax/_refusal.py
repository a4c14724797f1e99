"""Refusals from inside a jitted step.

Under ``jit`` a value such as a schedule's factor is only known when the compiled step runs,
too late for a Python ``raise`` at trace time. ``refuse_where`` puts the check in the compiled
code: a ``lax.cond`` whose refusing branch, taken only when the condition holds, calls back to
the host and raises ``Refused`` there, so a valid step runs no callback. But a compiled step
that holds a callback leaves JAX's fast dispatch path (about 1 ms more per call measured on a
CPU): keep it off the per-micro-batch path where the check can be made on the host instead.
JAX reports the callback's error as a runtime error (the message inside its text); ``reraised``
turns it back into the ``Refused`` it was. Without ``donate`` the state passed to the failed
call is unchanged; with it, that state is gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import numpy as np

_MESSAGE = re.compile(r"Refused: ([^\n]*)")


class Refused(ValueError):
    """A value a compiled step found invalid when it ran (the message says which and what to do)."""


def refuse_where(condition: Any, message: Callable[..., str], *operands: Any) -> None:
    """Raise ``Refused(message(*operands))`` when ``condition`` holds: right away when every
    value is concrete, else when the compiled step runs (the operands reach ``message`` as
    NumPy values)."""
    if not any(isinstance(x, jax.core.Tracer) for x in (condition, *operands)):
        if bool(np.any(np.asarray(condition))):
            raise Refused(message(*(np.asarray(x) for x in operands)))
        return

    def refuse(flag: np.ndarray, *values: np.ndarray) -> None:
        if np.any(flag):  # checked again: under vmap a cond runs both branches
            raise Refused(message(*values))

    # a debug callback, not io_callback: JAX runs only the former inside a vmapped cond
    jax.lax.cond(condition, lambda args: jax.debug.callback(refuse, *args), lambda args: None,
                 (condition, *operands))


def reraised(error: Exception) -> NoReturn:
    """Raise the ``Refused`` that ``error`` (a JAX runtime error) carries, else ``error`` itself."""
    found = _MESSAGE.search(str(error))
    if found is None:
        raise error
    raise Refused(found.group(1)) from None
