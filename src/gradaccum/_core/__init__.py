"""Framework-agnostic core: stopping rules, records and argument checks.

Nothing here imports torch or jax; both backends build on it.
"""

from .records import StepRecord as StepRecord
from .rules import Decision as Decision
from .rules import FixedSteps as FixedSteps
from .rules import StoppingRule as StoppingRule
from .rules import WindowView as WindowView
from .rules import check_rule as check_rule
