from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

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
BoardView = Literal["accuracy", "efficiency"]

# The contest's rules (issue 11), described once for creating, reading and changing them.
FREEZE_AT = ("With a UTC offset; after starts_at and before the deadline. From then on the public board that "
             "others see stops changing (each team still sees its own new scores). Null: no freeze.")
FINAL_ENTRIES = ("How many submissions a team may mark as final before the deadline (PUT .../final-entries); a "
                 "team that marks none is judged on its best public entry. The private board ranks each team's "
                 "best final entry by private accuracy.")
REVEAL_CONFIGS = ("After the deadline, show every entry's config to everyone. Before it (or when false) only its "
                  "own team and the organizers see an entry's config.")
BOARD_VIEW = ("The board's default order: accuracy (rank bands), or efficiency (the accuracy / GPU-hours "
              "Pareto front).")


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
    freeze_at: Timestamp | None = Field(None, description=FREEZE_AT)
    final_entries: int = Field(2, ge=1, le=20, description=FINAL_ENTRIES)
    reveal_configs: bool = Field(False, description=REVEAL_CONFIGS)
    board_view: BoardView = Field("accuracy", description=BOARD_VIEW)

    @field_validator("starts_at", "deadline", "freeze_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return to_utc(v)

    @model_validator(mode="after")
    def _in_order(self) -> CompetitionCreate:
        if (problem := order_problem(self.starts_at, self.freeze_at, self.deadline)) is not None:
            raise ValueError(problem[1])
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


def to_utc(v: datetime | None) -> datetime | None:
    return v.astimezone(UTC) if v else v  # SQLite keeps no offset: store every time in UTC


def order_problem(starts_at: datetime | None, freeze_at: datetime | None,
                  deadline: datetime | None) -> tuple[str, str] | None:
    """(field, why) when the competition's times are out of order (starts_at < freeze_at < deadline, each
    where set), else None."""
    if starts_at and deadline and deadline <= starts_at:
        return "deadline", "deadline must be after starts_at"
    if freeze_at and deadline and freeze_at >= deadline:
        return "freeze_at", "freeze_at must be before the deadline"
    if freeze_at and starts_at and freeze_at <= starts_at:
        return "freeze_at", "freeze_at must be after starts_at"
    return None


class CompetitionRules(BaseModel):
    """PATCH /api/competitions/{slug}: the fields sent are changed, the others kept. An explicit null clears
    a field that may be null (deadline, freeze_at, submission_quota, quota_window_hours)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    title: Title | None = None
    deadline: Timestamp | None = Field(None, description="With a UTC offset; after starts_at and freeze_at.")
    freeze_at: Timestamp | None = Field(None, description=FREEZE_AT)
    final_entries: int | None = Field(None, ge=1, le=20, description=FINAL_ENTRIES)
    reveal_configs: bool | None = Field(None, description=REVEAL_CONFIGS)
    board_view: BoardView | None = Field(None, description=BOARD_VIEW)
    submission_quota: int | None = Field(None, ge=1, le=100000)
    quota_window_hours: float | None = Field(None, gt=0, le=24 * 365)

    @field_validator("deadline", "freeze_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return to_utc(v)

    @field_validator("title", "final_entries", "reveal_configs", "board_view", mode="before")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        # Only called for a value that was sent: null for one of these is an error, not "unchanged".
        if v is None:
            raise ValueError("may not be null; leave the field out to keep it")
        return v

    def changes(self) -> dict[str, Any]:
        """The fields that were sent, with their new values."""
        return {name: getattr(self, name) for name in self.model_fields_set}


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
    freeze_at: datetime | None = Field(description=FREEZE_AT)
    final_entries: int = Field(description=FINAL_ENTRIES)
    reveal_configs: bool = Field(description=REVEAL_CONFIGS)
    board_view: BoardView = Field(description=BOARD_VIEW)
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


class FinalEntriesIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    submission_ids: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(max_length=20, description=(
        "The team's final entries, replacing its earlier choice: distinct ids of its own submissions in this "
        "competition, at most the competition's final_entries, each queued, running or succeeded. [] clears "
        "the choice (the team's best public entry is used)."))

    @field_validator("submission_ids")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("submission ids must be distinct")
        return v


class FinalEntriesOut(BaseModel):
    limit: int = Field(description="The competition's final_entries: how many a team may mark.")
    chosen: list[int] = Field(description="The submissions the team marked final.")
    effective: list[int] = Field(description=(
        "What the private board judges the team on: `chosen`, or when it chose none its best public entry "
        "(empty while it has none)."))
    default_used: bool = Field(description="True when the team chose none and `effective` is the default.")
    locked: bool = Field(description="The deadline has passed: the choice can no longer change.")
