from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class WorkerNode(Base):
    """One Celery worker process, as it reports itself (start-up, heartbeats, task start/end)."""

    __tablename__ = "worker_node"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(500))
    device_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    current_run_id: Mapped[int | None] = mapped_column(ForeignKey("run.id", ondelete="SET NULL"), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    # Why this worker refuses work (a message from another deployment, a device that is not its class).
    problem: Mapped[str | None] = mapped_column(Text, nullable=True)


class Deployment(Base):
    """This database's identity (one row, made by migration 0005). The API stamps it on every message; a
    worker whose database says otherwise was pointed at the wrong database or shares another
    deployment's broker, and leaves the message for the right consumer."""

    __tablename__ = "deployment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RateWindow(Base):
    """Requests counted per key (scope, token or address) and fixed window; app.ratelimit reads and bumps it."""

    __tablename__ = "rate_window"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    window: Mapped[int] = mapped_column(Integer, primary_key=True)
    hits: Mapped[int] = mapped_column(Integer)
