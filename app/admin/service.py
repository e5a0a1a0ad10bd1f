"""The worker fleet as workers report it, queue depth from both the database and the broker, runs whose
heartbeat went stale, and the hardware classes admins define."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.admin.models import HardwareClass, WorkerNode
from app.admin.schemas import HardwareClassIn
from app.audit.service import record
from app.auth.models import User
from app.config import get_settings
from app.db import utcnow
from app.queue import queue_depth
from app.submissions.models import Run, RunStatus
from app.submissions.runs import stale_heartbeat

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
    """Workers, queues and stale runs (app.admin.schemas.FleetOut). A running run is stale by the sweeper's
    own rule (app.submissions.runs.stale_heartbeat, past the settings' stale_after_seconds)."""
    now = utcnow()
    nodes = []
    for n, submission_id in session.execute(
            select(WorkerNode, Run.submission_id).outerjoin(Run, Run.id == WorkerNode.current_run_id)
            .order_by(WorkerNode.hostname)):
        last = n.last_seen
        nodes.append({
            "hostname": n.hostname, "queues": [q for q in n.queues.split(",") if q], "device_name": n.device_name,
            "state": "offline" if now - last > ONLINE_WITHIN else ("busy" if n.current_run_id else "idle"),
            "current_run_id": n.current_run_id, "current_submission_id": submission_id,
            "started_at": n.started_at, "last_seen": n.last_seen,
            "last_seen_age_seconds": max(0.0, (now - last).total_seconds()),
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
                    "broker_messages": queue_depth(q), **_oldest_waiting(session, q, now)} for q in queues],
        "stale_runs": _stale_runs(session, now),
    }


def _oldest_waiting(session: Session, queue: str, now: datetime) -> dict:
    """The queue's longest-waiting queued run (first submitted; ties: the lower id). One indexed look-up per
    queue: there are a handful of queues, and the run table may hold a competition's 100,000 runs."""
    row = session.execute(select(Run.id, Run.created_at).where(Run.queue == queue, Run.status == RunStatus.queued)
                          .order_by(Run.created_at, Run.id).limit(1)).first()
    return {"oldest_queued_run_id": row.id if row else None, "oldest_queued_at": row.created_at if row else None,
            "oldest_queued_age_seconds": max(0.0, (now - row.created_at).total_seconds()) if row else None}


def _stale_runs(session: Session, now: datetime) -> list[dict]:
    cutoff = now - timedelta(seconds=get_settings().stale_after_seconds)
    rows = session.execute(
        select(Run.id, Run.submission_id, Run.queue, Run.worker_hostname, Run.attempts, Run.started_at,
               Run.heartbeat_at)
        .where(stale_heartbeat(cutoff)).order_by(Run.heartbeat_at, Run.id))
    return [{"run_id": r.id, "submission_id": r.submission_id, "queue": r.queue, "worker_hostname": r.worker_hostname,
             "attempts": r.attempts, "started_at": r.started_at, "heartbeat_at": r.heartbeat_at,
             "heartbeat_age_seconds": (now - r.heartbeat_at).total_seconds()} for r in rows]


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
