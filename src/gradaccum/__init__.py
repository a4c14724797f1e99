"""gradaccum: gradient accumulation that is exact, adaptive and fast.

The top level holds the framework-agnostic pieces (stopping rules and records);
the backends live in ``gradaccum.torch`` and ``gradaccum.jax`` so that
importing ``gradaccum`` imports neither framework.
"""

from ._core import GSNR as GSNR
from ._core import AccumulationConfig as AccumulationConfig
from ._core import BatchRamp as BatchRamp
from ._core import Decision as Decision
from ._core import FixedSteps as FixedSteps
from ._core import GSNRPlanner as GSNRPlanner
from ._core import MonitorLog as MonitorLog
from ._core import NoiseScaleEMA as NoiseScaleEMA
from ._core import NoiseScalePlanner as NoiseScalePlanner
from ._core import NormTest as NormTest
from ._core import NormTestPlanner as NormTestPlanner
from ._core import Planner as Planner
from ._core import StepRecord as StepRecord
from ._core import StoppingRule as StoppingRule
from ._core import WindowView as WindowView
from ._core import lr_factor as lr_factor
from ._core import plan_micro_batches as plan_micro_batches
from ._core import token_count as token_count

__version__ = "0.1.0"

__all__ = ["GSNR", "AccumulationConfig", "BatchRamp", "Decision", "FixedSteps", "GSNRPlanner", "MonitorLog",
           "NoiseScaleEMA", "NoiseScalePlanner", "NormTest", "NormTestPlanner", "Planner", "StepRecord", "StoppingRule",
           "WindowView",
           "lr_factor", "plan_micro_batches", "token_count", "__version__"]
