"""Per-sample gradient statistics for PyTorch: a collector and a layer registry."""

from . import _attention, _layers  # noqa: F401  (fill the registries)
from ._blocks import PartialCommit as PartialCommit
from ._collector import PerSampleGradStats as PerSampleGradStats
from ._registry import REGISTRY as REGISTRY
from ._registry import LayerStats as LayerStats
from ._registry import RowSquares as RowSquares
from ._registry import register_layer_stats as register_layer_stats
