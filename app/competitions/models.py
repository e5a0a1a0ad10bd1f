from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, PydanticJSON, TimestampMixin, UTCDateTime
from worker.engine.config import Budget, DataSpec, ModelSpec


class Competition(TimestampMixin, Base):
    __tablename__ = "competition"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    title: Mapped[str] = mapped_column(String(200))
    # What the competition fixes for every run, stored as JSON and read back typed.
    dataset: Mapped[DataSpec] = mapped_column(PydanticJSON(DataSpec))
    model: Mapped[ModelSpec] = mapped_column(PydanticJSON(ModelSpec))
    budget: Mapped[Budget] = mapped_column(PydanticJSON(Budget))
    hardware_class: Mapped[str] = mapped_column(String(50), default="cpu")
    # {hyperparameter: {"min":..,"max":..} | {"choices":[..]}}
    search_space: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    submission_quota: Mapped[int | None] = mapped_column(Integer, nullable=True)
    quota_window_hours: Mapped[float | None] = mapped_column(nullable=True)
    starts_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    deadline: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # One run per seed per submission.
    seeds: Mapped[list[int]] = mapped_column(JSON, default=lambda: [0])
    # Deterministic kernels: slower, but a rerun of the same config reproduces the same score bit for bit.
    deterministic: Mapped[bool] = mapped_column(Boolean, default=False)
    # Optional per-team GPU-hour budget: an entry predicted to cost more than what is left is refused (429).
    gpu_hour_budget: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Optional cap on one team's runs training at once (fair-share dispatch skips a team at its cap).
    max_running_per_team: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"), nullable=True)
    # The contest's rules (issue 11). After freeze_at the public board others see stops changing; a team may
    # mark up to final_entries submissions as final before the deadline; after the deadline the private
    # board is revealed, and with reveal_configs every entry's config too. board_view is the board's default
    # order: "accuracy" (rank bands), or "efficiency" (the accuracy / GPU-hours Pareto front).
    freeze_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    final_entries: Mapped[int] = mapped_column(Integer, default=2, server_default="2")
    reveal_configs: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    board_view: Mapped[str] = mapped_column(String(20), default="accuracy", server_default="accuracy")


class Team(TimestampMixin, Base):
    __tablename__ = "team"
    # Unique by name_key (app.names.name_key: case-folded NFKC), so "Owls" and "ＯＷＬＳ" are one team.
    __table_args__ = (UniqueConstraint("competition_id", "name_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    competition_id: Mapped[int] = mapped_column(ForeignKey("competition.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    name_key: Mapped[str] = mapped_column(String(100))
    # Team names are public (leaderboard); joining an existing team takes this secret from a member.
    invite_code: Mapped[str] = mapped_column(String(64))
    # How many submissions the team made (every status): counted by create_submission under the team's
    # lock, so the board reads one number per team instead of counting 100,000 submissions per request.
    submissions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Membership(TimestampMixin, Base):
    """A participant's seat in one team of one competition."""

    __tablename__ = "membership"
    __table_args__ = (UniqueConstraint("user_id", "competition_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"))
    team_id: Mapped[int] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), index=True)
    competition_id: Mapped[int] = mapped_column(ForeignKey("competition.id", ondelete="CASCADE"))
