"""The worker fleet as workers report it, queue depth from both the database and the broker, and the
hardware classes admins define."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.admin.models import HardwareClass, WorkerNode
from app.admin.schemas import HardwareClassIn
from app.audit.service import record
from app.auth.models import User
from app.db import utcnow
from app.queue import queue_depth
from app.submissions.models import Run, RunStatus

ONLINE_WITHIN = timedelta(seconds=60)


def upsert_node(session: Session, hostname: str, queues: str, **fields) -> None:
    node = session.get(WorkerNode, hostname)
    now = utcnow()
    if node is None:
        node = WorkerNode(hostname=hostname, queues=queues, started_at=now, last_seen=now)
        session.add(node)
    node.queues = queues
    node.last_seen = now
    for k, v in fields.items():
        setattr(node, k, v)
    session.flush()


def remove_node(session: Session, hostname: str) -> None:
    node = session.get(WorkerNode, hostname)
    if node is not None:
        session.delete(node)


def fleet(session: Session) -> dict:
    now = utcnow()
    nodes = []
    for n in session.scalars(select(WorkerNode).order_by(WorkerNode.hostname)):
        last = n.last_seen
        nodes.append({
            "hostname": n.hostname, "queues": [q for q in n.queues.split(",") if q], "device_name": n.device_name,
            "state": "offline" if now - last > ONLINE_WITHIN else ("busy" if n.current_run_id else "idle"),
            "current_run_id": n.current_run_id, "started_at": n.started_at, "last_seen": n.last_seen,
            "problem": n.problem, "hardware_class": n.hardware_class, "threads": n.threads,
        })
    queued = dict(session.execute(
        select(Run.queue, func.count()).where(Run.status == RunStatus.queued).group_by(Run.queue)).all())
    running = dict(session.execute(
        select(Run.queue, func.count()).where(Run.status == RunStatus.running).group_by(Run.queue)).all())
    queues = sorted(set(queued) | set(running) | {q for n in nodes for q in n["queues"]})
    return {
        "workers": nodes,
        "queues": [{"queue": q, "queued_runs": queued.get(q, 0), "running_runs": running.get(q, 0),
                    "broker_messages": queue_depth(q)} for q in queues],
    }


def hardware_classes(session: Session) -> list[HardwareClass]:
    return list(session.scalars(select(HardwareClass).order_by(HardwareClass.name)))


def put_hardware_class(session: Session, name: str, data: HardwareClassIn,
                       actor: User | None) -> tuple[HardwareClass, bool]:
    """Create class `name`, or replace every field of it; -> (the class, whether it is new). Workers check
    their device against the new definition at their next start, and each run finished from now on."""
    cls = session.get(HardwareClass, name)
    created = cls is None
    if created:
        cls = HardwareClass(name=name)
        session.add(cls)
    for field, value in data.model_dump().items():
        setattr(cls, field, value)
    cls.updated_at = utcnow()
    session.flush()
    record(session, actor, "hardware_class.create" if created else "hardware_class.replace",
           f"hardware_class:{name}", **data.model_dump())
    return cls, created
