"""Watches a statistics rule's decisions and says when it is not adapting.

docs/design.md, "GSNR": with a fixed tau the per-sample GSNR tends to stop at the first
increment or to run to the cap every time; then the "adaptive" run is a fixed-batch
run in disguise, and the user should hear about it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecisionMonitor:
    """Counts windows that closed after one increment and windows that hit the cap.

    ``observe`` returns a warning message once, after ``patience`` rule-closed windows
    that all stopped at the first increment, or all hit the cap.
    """

    patience: int = 50
    windows: int = 0
    first: int = 0
    capped: int = 0
    warned: bool = False

    def observe(self, micro_batches: int, capped: bool) -> str | None:
        self.windows += 1
        self.first += micro_batches == 1 and not capped
        self.capped += bool(capped)
        if self.warned or self.windows < self.patience:
            return None
        if self.first == self.windows:
            self.warned = True
            return (f"the stopping rule closed all of the first {self.windows} windows after one increment: "
                    "it is not adapting (tau too low for this scale?)")
        if self.capped == self.windows:
            self.warned = True
            return (f"the stopping rule ran all of the first {self.windows} windows to max_samples: it is not "
                    "adapting (tau too high? the per-sample GSNR scale tends to r + 1/n; try scale='mean')")
        return None
