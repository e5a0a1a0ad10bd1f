from __future__ import annotations

from enum import StrEnum

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, TimestampMixin


class Role(StrEnum):
    participant = "participant"
    organizer = "organizer"
    admin = "admin"


class User(TimestampMixin, Base):
    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20), default=Role.participant)
    # sha256 of the bearer token; the token itself is shown once and never stored. NULL: revoked (the
    # account can't sign in until its owner or an admin issues a new token).
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, index=True, nullable=True)
