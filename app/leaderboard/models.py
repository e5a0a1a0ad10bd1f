from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, ForeignKey
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
