from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, ForeignKey, Integer, String, Text
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
    hardware_class: Mapped[str | None] = mapped_column(String(50), nullable=True)  # the class it serves
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)  # torch threads: its share of the node


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


class HardwareClass(Base):
    """A kind of device every run of a competition is scored on (competition.hardware_class names one).
    Admins edit these (PUT /api/admin/hardware-classes/{name}); migration 0007 seeds the common ones. A
    worker serving a class checks its real device against it at start-up and refuses to consume on a
    mismatch (app.hardware.check_device)."""

    __tablename__ = "hardware_class"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    device_type: Mapped[str] = mapped_column(String(10))  # "cuda" or "cpu"
    # A regular expression searched (case-insensitively) in the device's name; empty accepts any name.
    name_pattern: Mapped[str] = mapped_column(String(200), default="")
    min_memory_gib: Mapped[float | None] = mapped_column(Float, nullable=True)  # device memory (GPU only)
    max_memory_gib: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What precision "auto" must resolve to on it (bf16, fp16, fp32); None accepts any.
    precision: Mapped[str | None] = mapped_column(String(10), nullable=True)
    # CPU classes: the ATen CPU capability the worker must run with (e.g. AVX512, AVX2); None accepts any.
    cpu_capability: Mapped[str | None] = mapped_column(String(20), nullable=True)
    # The prior for cost prediction until finished runs measure it (app.costs): images/s of a width-64
    # ResNet18 on 32-pixel images, training and evaluation.
    train_images_per_sec: Mapped[float] = mapped_column(Float)
    eval_images_per_sec: Mapped[float] = mapped_column(Float)
    description: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Throughput(Base):
    """Measured images/s per hardware class, model and image size, updated from every finished run
    (app.costs.learn): what the cost and ETA of the next submission are predicted from."""

    __tablename__ = "throughput"

    hardware_class: Mapped[str] = mapped_column(String(50), primary_key=True)
    model_key: Mapped[str] = mapped_column(String(100), primary_key=True)  # arch, width, stem, ... (app.costs)
    image_size: Mapped[int] = mapped_column(Integer, primary_key=True)
    train_images_per_sec: Mapped[float] = mapped_column(Float)
    eval_images_per_sec: Mapped[float] = mapped_column(Float)
    runs: Mapped[int] = mapped_column(Integer, default=0)  # how many finished runs the figures average
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
