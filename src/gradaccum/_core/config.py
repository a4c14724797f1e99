"""Accumulation settings as a JAX training config spells them: ``batch_size`` x
``gradient_accumulation_steps`` (the effective batch), plus the stopping rule.

Framework-agnostic: both backends build their rule from it. In YAML::

    batch_size: 32                  # samples per micro-batch (an adaptive rule's increment)
    gradient_accumulation_steps: 16 # micro-batches per window (an adaptive rule's cap)
    rule: {name: gsnr, tau: 1.5, scale: mean}   # or "fixed" (the default), or {name: norm_test, theta: 1}

For an adaptive rule the window grows by ``batch_size`` samples until the rule stops
it or it reaches ``batch_size * gradient_accumulation_steps`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .planners import is_planner
from .rules import GSNR, FixedSteps, NormTest, StoppingRule, check_rule
from .validation import check_positive_int

_RULES: dict[str, tuple[Callable[..., StoppingRule], tuple[str, ...]]] = {
    # name -> (rule class, settings the YAML may give besides the sizes)
    "fixed": (FixedSteps, ()),
    "gsnr": (GSNR, ("tau", "scale", "min_samples")),
    "norm_test": (NormTest, ("theta", "min_samples")),
}
_KEYS = ("batch_size", "gradient_accumulation_steps", "rule")


@dataclass(frozen=True)
class AccumulationConfig:
    """Micro-batch size, accumulation steps and stopping rule, validated on creation.

    Attributes:
      batch_size: samples per micro-batch.
      gradient_accumulation_steps: micro-batches per window (``FixedSteps``), or the cap of
        an adaptive window in micro-batches.
      rule: ``{"name": "fixed"}`` (default), ``{"name": "gsnr", "tau": ..., "scale": ...}``
        or ``{"name": "norm_test", "theta": ...}``; a bare string names a rule without
        settings.
    """

    batch_size: int
    gradient_accumulation_steps: int = 1
    rule: Mapping[str, Any] = field(default_factory=lambda: {"name": "fixed"})

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        rule = {"name": self.rule} if isinstance(self.rule, str) else self.rule
        if not isinstance(rule, Mapping) or "name" not in rule:
            raise ValueError(f"rule must be a rule name or a mapping with a 'name', got {self.rule!r}")
        if rule["name"] not in _RULES:
            raise ValueError(f"rule.name must be one of {', '.join(map(repr, _RULES))}, got {rule['name']!r}")
        allowed = _RULES[rule["name"]][1]
        unknown = sorted(set(rule) - {"name", *allowed})
        if unknown:
            raise ValueError(f"rule {rule['name']!r} takes {', '.join(allowed) or 'no settings'}; "
                             f"unknown: {', '.join(unknown)}")
        object.__setattr__(self, "rule", dict(rule))
        self.make_rule()  # the rule checks its own settings (tau > 0, scale, ...)

    @property
    def effective_batch(self) -> int:
        """Samples per window: exact for ``FixedSteps``, the cap for adaptive rules."""
        return self.batch_size * self.gradient_accumulation_steps

    def make_rule(self) -> StoppingRule:
        """The stopping rule these settings describe."""
        cls, _ = _RULES[self.rule["name"]]
        settings = {k: v for k, v in self.rule.items() if k != "name"}
        if cls is FixedSteps:
            return FixedSteps(self.gradient_accumulation_steps)
        try:
            return cls(**settings, increment=self.batch_size, max_samples=self.effective_batch)
        except TypeError as error:
            raise ValueError(f"rule {self.rule['name']!r}: {error}") from None

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> AccumulationConfig:
        """Settings from a mapping (a parsed YAML file); unknown keys are refused."""
        if not isinstance(settings, Mapping):
            raise TypeError(f"accumulation config must be a mapping, got {type(settings).__name__}")
        unknown = sorted(set(settings) - set(_KEYS))
        if unknown:
            raise ValueError(f"accumulation config: unknown keys {', '.join(unknown)} "
                             f"(expected {', '.join(_KEYS)})")
        if "batch_size" not in settings:
            raise ValueError("accumulation config: batch_size is required")
        return cls(**settings)

    @classmethod
    def from_yaml(cls, source: str | Path) -> AccumulationConfig:
        """Settings from a YAML file path, or from YAML text if ``source`` contains a newline
        (PyYAML is imported here, at the edge: the core itself reads no YAML)."""
        from .._yaml import YAMLError, safe_load

        try:
            text = source if isinstance(source, str) and "\n" in source else Path(source).read_text()
            loaded = safe_load(text)
        except (OSError, YAMLError) as error:
            raise ValueError(f"accumulation config: cannot read {source}: {error}") from None
        return cls.from_mapping(loaded or {})


def as_rule(rule: Any) -> Any:
    """The stopping rule or planner itself, or the rule an ``AccumulationConfig`` describes (checked)."""
    if isinstance(rule, AccumulationConfig):
        return rule.make_rule()
    if is_planner(rule):
        return rule
    return check_rule(rule)
