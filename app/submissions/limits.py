"""How long a run may take: its soft and hard time limits, derived from its prediction and its budget.

soft = max(floor, predicted device-seconds x factor), capped, when the budget sets max_seconds, at
max_seconds + an evaluation allowance (eval_share x max_seconds: evaluation is not part of max_seconds) +
the floor, and at time_limit_max_seconds. A run with no prediction gets that cap (or time_limit_max_seconds
when its budget has no max_seconds either). hard = soft + grace. The settings are app.config's time_limit_*.
The worker enforces them (worker.tasks): past soft the run stops and ends as `timeout`; past hard its
process is killed.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from worker.engine.config import Budget


@dataclass(frozen=True)
class TimeLimits:
    soft_seconds: float
    hard_seconds: float
    basis: str  # how the soft limit was derived, in words

    def exceeded(self) -> str:
        """The run's error once it ran past its soft limit."""
        return f"ran past its time limit of {self.soft_seconds:.0f} s ({self.basis})"


def time_limits(predicted_seconds: float | None, budget: Budget, settings: Settings) -> TimeLimits:
    floor, factor = settings.time_limit_floor_seconds, settings.time_limit_factor
    cap, cap_basis = settings.time_limit_max_seconds, "the worker's longest limit"
    if budget.max_seconds is not None:
        budget_cap = budget.max_seconds * (1 + settings.time_limit_eval_share) + floor
        if budget_cap < cap:
            cap = budget_cap
            cap_basis = (f"the budget's max_seconds {budget.max_seconds:g} s, plus "
                         f"{budget.max_seconds * settings.time_limit_eval_share:g} s for evaluation and "
                         f"{floor:g} s for set-up")
    if predicted_seconds is None:
        soft, basis = cap, f"no prediction: {cap_basis}"
    else:
        scaled = predicted_seconds * factor
        soft = max(floor, scaled)
        basis = f"predicted {predicted_seconds:.0f} s × {factor:g}"
        if scaled < floor:
            basis = f"the {floor:g} s floor; {basis} = {scaled:.0f} s"
        if soft > cap:
            soft, basis = cap, f"{basis}, capped at {cap_basis}"
    return TimeLimits(soft_seconds=soft, hard_seconds=soft + settings.time_limit_grace_seconds, basis=basis)
