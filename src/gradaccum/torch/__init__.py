"""PyTorch backend: the Accumulator and its helpers."""

from ._accumulator import Accumulator as Accumulator
from ._accumulator import NonFiniteError as NonFiniteError
from ._accumulator import NonFinitePolicy as NonFinitePolicy
from ._stats import PerSampleGradStats as PerSampleGradStats

__all__ = ["Accumulator", "NonFiniteError", "NonFinitePolicy", "PerSampleGradStats"]
