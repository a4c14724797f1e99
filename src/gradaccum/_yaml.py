"""YAML reading with YAML 1.2 numbers (``1e-3`` is a float) and no duplicate keys.

The library's edge: config files (``AccumulationConfig.from_yaml``, the experiment's
``--config``) are read here, and only the code that reads one imports PyYAML; the core and
``import gradaccum`` do not.

PyYAML implements YAML 1.1, whose float pattern needs a dot (``1.0e-3``), so a config
saying ``tau: 1e-3`` would get the *string* "1e-3" and be refused (or worse). This
loader adds the 1.2 pattern for every number a user writes in scientific notation.

PyYAML also keeps the last of two equal keys in a mapping without a word (a config naming
``lr`` twice trained with the second); YAML 1.2 says keys are unique, and this loader refuses
a duplicate, naming it and both lines. Keys merged in with ``<<`` may be overridden, as YAML's
merge key intends.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

YAMLError = yaml.YAMLError  # what a malformed file raises

class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the duplicate key {key!r} (first at line {first.start_mark.line + 1}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


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
