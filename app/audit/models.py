from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class AuditEvent(Base):
    """One admin or organizer action, or a token rotated or revoked through the API, kept for admins to
    review. (The bootstrap admin's token follows HPARENA_ADMIN_TOKEN at every start, unaudited.)"""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # The actor's name is copied: the record must still say who acted if the account is deleted later.
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"), nullable=True)
    actor_name: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(60))  # e.g. "competition.create", "token.revoke"
    target: Mapped[str] = mapped_column(String(200))  # e.g. "competition:fall-2026", "user:12"
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
