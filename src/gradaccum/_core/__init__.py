"""Framework-agnostic core: stopping rules, records and argument checks.

Nothing here imports torch or jax; both backends build on it.
"""

from .config import AccumulationConfig as AccumulationConfig
from .counting import token_count as token_count
from .lr_scaling import LR_SCALINGS as LR_SCALINGS
from .lr_scaling import lr_factor as lr_factor
from .moments import Moments as Moments
from .moments import merge as merge
from .moments import moments_from_sums as moments_from_sums
from .monitor import DecisionMonitor as DecisionMonitor
from .monitor_log import MonitorLog as MonitorLog
from .noise_scale import NoiseScaleEMA as NoiseScaleEMA
from .noise_scale import noise_scale as noise_scale
from .noise_scale import noise_terms as noise_terms
from .planners import BatchRamp as BatchRamp
from .planners import GSNRPlanner as GSNRPlanner
from .planners import NoiseScalePlanner as NoiseScalePlanner
from .planners import NormTestPlanner as NormTestPlanner
from .planners import Planner as Planner
from .planners import is_planner as is_planner
from .planning import plan_micro_batches as plan_micro_batches
from .records import StepRecord as StepRecord
from .rules import GSNR as GSNR
from .rules import Decision as Decision
from .rules import FixedSteps as FixedSteps
from .rules import NormTest as NormTest
from .rules import StoppingRule as StoppingRule
from .rules import WindowView as WindowView
from .rules import check_rule as check_rule
