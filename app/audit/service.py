"""The audit log: who did what to which object, written in the same transaction as the action itself."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.auth.models import User


def record(session: Session, actor: User | None, action: str, target: str, **detail: Any) -> AuditEvent:
    event = AuditEvent(actor_id=actor.id if actor else None, actor_name=actor.name if actor else "anonymous",
                       action=action, target=target, detail=detail)
    session.add(event)
    session.flush()
    return event


def recent(session: Session, limit: int, before_id: int | None = None) -> list[AuditEvent]:
    """Newest first; page back with `before_id` (the smallest id of the page before)."""
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before_id is not None:
        q = q.where(AuditEvent.id < before_id)
    return list(session.scalars(q))
