from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from app.hardware import CLASS_NAME
from app.names import Name, Title
from worker.engine.config import Budget, Choices, DataSpec, ModelSpec, Range, effective_space

SLUG = r"^[a-z0-9][a-z0-9-]{1,62}$"


def _rfc3339_text(v: Any) -> Any:
    if not isinstance(v, str | datetime):  # pydantic would read a bare number as a Unix time
        raise ValueError("must be an RFC 3339 date-time string with an offset, e.g. 2026-12-01T09:00:00Z")
    return v


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]


class CompetitionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    slug: str = Field(pattern=SLUG)
    title: Title
    dataset: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    budget: Budget = Field(default_factory=Budget)
    hardware_class: str = Field("cpu", pattern=CLASS_NAME, description=(
        "The class every run is trained on: a defined one (GET /api/admin/hardware-classes), else 422."))
    search_space: dict[str, Range | Choices] = Field(
        default_factory=dict,
        description="Per-hyperparameter bounds {min,max} or {choices:[...]}; narrows the engine's own bounds.",
    )
    submission_quota: int | None = Field(None, ge=1, le=100000)
    quota_window_hours: float | None = Field(None, gt=0, le=24 * 365)
    starts_at: Timestamp | None = Field(None, description="With a UTC offset, e.g. 2026-12-01T09:00:00Z")
    deadline: Timestamp | None = Field(None, description="With a UTC offset, e.g. 2026-12-15T17:00:00+01:00")
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(default_factory=lambda: [0], min_length=1,
                                                                  max_length=16)
    deterministic: bool = Field(False, description="Deterministic kernels (slower; bitwise-reproducible runs).")
    gpu_hour_budget: float | None = Field(None, gt=0, le=1_000_000, description=(
        "Per-team budget in GPU-hours (CPU-hours on a CPU class). An entry whose predicted cost exceeds what is "
        "left is refused with 429; each run is charged what it measured when it ends; infrastructure failures "
        "are refunded. Null: no budget."))
    max_running_per_team: int | None = Field(None, ge=1, le=10_000, description=(
        "At most this many of one team's runs train at once; its other runs wait while other teams' go."))

    @field_validator("starts_at", "deadline")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return v.astimezone(UTC) if v else v  # SQLite keeps no offset: store every time in UTC

    @model_validator(mode="after")
    def _deadline_after_start(self) -> CompetitionCreate:
        if self.starts_at and self.deadline and self.deadline <= self.starts_at:
            raise ValueError("deadline must be after starts_at")
        return self

    @field_validator("search_space")
    @classmethod
    def _known_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        effective_space(v)  # raises on unknown hyperparameters
        return v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("seeds must be distinct non-negative integers")
        return v


class CompetitionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    slug: str
    title: str
    dataset: DataSpec
    model: ModelSpec
    budget: Budget
    hardware_class: str
    search_space: dict[str, Any]
    submission_quota: int | None
    quota_window_hours: float | None
    starts_at: datetime | None
    deadline: datetime | None
    seeds: list[int]
    deterministic: bool
    gpu_hour_budget: float | None
    max_running_per_team: int | None
    created_at: datetime


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Name = Field(description="Your display name.")
    team: Name = Field(description="Team to create or join; names differ in more than case and width.")
    invite_code: str | None = Field(None, max_length=64, description="Needed to join an existing team.")


class JoinOut(BaseModel):
    user_id: int
    team_id: int
    team: str
    invite_code: str = Field(description="Share with teammates: joining this team requires it.")
    token: str | None = Field(None, description="Bearer token for a new participant; shown only once.")
