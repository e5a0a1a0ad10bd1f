"""What a service says went wrong, in the domain's words. Services raise these and know no HTTP;
`app.http.domain_error_handler` is the one place that turns each kind into a status, body and headers."""

from __future__ import annotations

from collections.abc import Sequence

from worker.engine.config import Violation


class DomainError(Exception):
    """Base of the errors a service raises for a caller to see; `detail` is the message it gets."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    """No such object, or not the caller's to see."""


class Conflict(DomainError):
    """The request contradicts the current state (already exists, already joined, closed, finished)."""


class Unauthorized(DomainError):
    """No credentials, or credentials that identify nobody."""


class Forbidden(DomainError):
    """The caller is known but may not do this."""


class QuotaExceeded(DomainError):
    """The team used its submissions; `retry_after` is the seconds until a slot frees (None: never)."""

    def __init__(self, detail: str, retry_after: int | None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class RateLimited(DomainError):
    """Too many requests from one token or address in the current window (app.ratelimit)."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class BudgetExceeded(DomainError):
    """The entry's predicted device-seconds exceed what is left of the team's GPU-hour budget (app.costs).
    The figures (device-seconds) go into the 429's body, so a client can say how much is left."""

    def __init__(self, detail: str, *, budget_seconds: float, spent_seconds: float, reserved_seconds: float,
                 remaining_seconds: float, predicted_seconds: float, cost_unit: str) -> None:
        super().__init__(detail)
        self.figures = {
            "budget_gpu_hours": budget_seconds / 3600, "remaining_gpu_hours": remaining_seconds / 3600,
            "remaining_seconds": remaining_seconds, "spent_seconds": spent_seconds,
            "reserved_seconds": reserved_seconds, "predicted_seconds": predicted_seconds,
            "predicted_gpu_hours": predicted_seconds / 3600, "cost_unit": cost_unit,
        }


class OutsideSearchSpace(DomainError):
    """A submitted config sets hyperparameters the competition does not allow, one violation each."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        super().__init__("; ".join(v.message for v in violations))
        self.violations = tuple(violations)


class InvalidField(DomainError):
    """A request's field names something that does not exist (a hardware class nobody defined): a 422 located
    at `field`, with the values it may take."""

    def __init__(self, field: str, value: object, detail: str, allowed: Sequence[str]) -> None:
        super().__init__(detail)
        self.field, self.value, self.allowed = field, value, tuple(allowed)
