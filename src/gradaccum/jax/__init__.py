"""JAX backend: an optax accumulation wrapper, a Flax ``AccumulatingTrainState`` with a
jitted step, adaptive (GSNR / norm test) windows under ``jit``, and data parallelism.

Needs the ``jax`` extra: ``pip install "gradaccum[jax]"``.
"""

try:
    import flax  # noqa: F401
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"gradaccum.jax needs jax, flax and optax: pip install 'gradaccum[jax]' ({error})") from error

from ._decisions import register_decision as register_decision
from ._decisions import traced_decision as traced_decision
from ._layer_stats import LayerStats as LayerStats
from ._layer_stats import layer_paths as layer_paths
from ._layer_stats import register_layer_stats as register_layer_stats
from ._layer_stats import statistics_path as statistics_path
from ._refusal import Refused as Refused
from ._schedule import ScaleByItemsState as ScaleByItemsState
from ._schedule import scale_by_items as scale_by_items
from ._sharding import data_mesh as data_mesh
from ._sharding import replicate as replicate
from ._sharding import shard_batch as shard_batch
from ._train_state import AccumulatingTrainState as AccumulatingTrainState
from ._train_state import flush as flush
from ._train_state import make_train_step as make_train_step
from ._train_state import noise_value_and_grad as noise_value_and_grad
from ._train_state import window_kind as window_kind
from ._transform import AccumulationState as AccumulationState
from ._transform import MeasuringAccumulationState as MeasuringAccumulationState
from ._transform import NoiseMeasurement as NoiseMeasurement
from ._transform import accumulate as accumulate
from ._transform import noise_scale as noise_scale
from ._window import Window as Window

__all__ = ["AccumulatingTrainState", "AccumulationState", "LayerStats", "MeasuringAccumulationState",
           "NoiseMeasurement", "Refused", "ScaleByItemsState", "Window", "accumulate", "data_mesh", "flush",
           "layer_paths", "make_train_step", "noise_scale", "noise_value_and_grad", "register_decision",
           "register_layer_stats", "replicate", "scale_by_items", "shard_batch", "statistics_path",
           "traced_decision", "window_kind"]
