"""The worker fleet as workers report it, and queue depth from both the database and the broker."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.admin.models import WorkerNode
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
            "hostname": n.hostname, "queues": n.queues.split(","), "device_name": n.device_name,
            "state": "offline" if now - last > ONLINE_WITHIN else ("busy" if n.current_run_id else "idle"),
            "current_run_id": n.current_run_id, "started_at": n.started_at, "last_seen": n.last_seen,
            "problem": n.problem,
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
