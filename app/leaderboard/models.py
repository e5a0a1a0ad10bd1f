from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class TeamBest(Base):
    """Each team's best succeeded submission, one row per team that has one: the table the board ranks,
    so a request ranks as many rows as there are teams instead of every submission.

    A documented index of the submission table, not a second record: the columns are copies of the best
    submission's, kept by leaderboard.service.note_submission in the very transaction that changes a
    submission's status (submissions.service.refresh_submission), and rebuilt from scratch by
    leaderboard.service.rebuild_best (migration 0006 backfills it the same way).
    """

    __tablename__ = "team_best"

    # Competition first: the board reads one competition's rows through the primary key's prefix.
    competition_id: Mapped[int] = mapped_column(ForeignKey("competition.id", ondelete="CASCADE"),
                                                primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("team.id", ondelete="CASCADE"), primary_key=True)
    # Unique: a submission is one team's; and the index keeps a cascade from a deleted submission cheap.
    submission_id: Mapped[int] = mapped_column(ForeignKey("submission.id", ondelete="CASCADE"), unique=True)
    accuracy: Mapped[float] = mapped_column(Float)
    gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime())  # the submission's created_at


class BoardCache(Base):
    """The computed boards of one competition (rank bands, Pareto front, public, frozen and private), kept so
    a request serves them instead of recomputing a bootstrap over every entry (app.leaderboard.board).

    `version` is bumped as every transaction that changes what the boards show commits (a result, a final
    mark, a rule); `payload` reflects `computed_version`. Workers refresh stale rows (board.refresh_stale);
    a reader serves the stale payload, marked stale, while a refresh is under way or the change is recent,
    and refreshes it itself only when no worker did (app.leaderboard.board.cached).
    """

    __tablename__ = "board_cache"

    competition_id: Mapped[int] = mapped_column(ForeignKey("competition.id", ondelete="CASCADE"),
                                                primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    computed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    computed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    refreshing_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Since when the oldest change the payload misses has waited (null: fresh): within the grace a worker is
    # expected to refresh it, and readers get the previous payload rather than computing one themselves.
    stale_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
