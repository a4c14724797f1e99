"""YAML reading with YAML 1.2 numbers: ``1e-3`` is a float.

PyYAML implements YAML 1.1, whose float pattern needs a dot (``1.0e-3``), so a config
saying ``tau: 1e-3`` would get the *string* "1e-3" and be refused (or worse). This
loader adds the 1.2 pattern for every number a user writes in scientific notation.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-3``, ``5E+2``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
