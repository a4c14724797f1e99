"""PyTorch backend: the Accumulator and its helpers. Needs the ``torch`` extra."""

try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"gradaccum.torch needs torch: pip install 'gradaccum[torch]' ({error})") from error

from ._accumulator import Accumulator as Accumulator
from ._accumulator import NonFiniteError as NonFiniteError
from ._accumulator import NonFinitePolicy as NonFinitePolicy
from ._memory import ProbeError as ProbeError
from ._memory import find_micro_batch_size as find_micro_batch_size
from ._memory import is_out_of_memory as is_out_of_memory
from ._memory import measure_peak_memory as measure_peak_memory
from ._memory import plan_accumulation as plan_accumulation
from ._monitor import Monitor as Monitor
from ._sampler import MicroBatchSampler as MicroBatchSampler
from ._stats import LayerStats as LayerStats
from ._stats import PartialCommit as PartialCommit
from ._stats import PerSampleGradStats as PerSampleGradStats
from ._stats import RowSquares as RowSquares
from ._stats import register_layer_stats as register_layer_stats

__all__ = ["Accumulator", "LayerStats", "MicroBatchSampler", "Monitor", "NonFiniteError", "NonFinitePolicy",
           "PartialCommit", "PerSampleGradStats", "ProbeError", "RowSquares", "find_micro_batch_size",
           "is_out_of_memory", "measure_peak_memory", "plan_accumulation", "register_layer_stats"]
