"""Dispatch: the database decides what must run and what runs next; the broker only wakes workers.

A broker message is a wake-up token for one queue (a hardware class). It names no run: the worker that
takes it claims the fairest queued run of its queue in the database (`app.submissions.runs.claim_next`).
So a lost message loses nothing, a duplicate costs one empty claim, and broker order decides nothing.

The invariant, kept by `reconcile` from every worker's beat: the broker holds at least as many tokens
for a queue as the database has queued runs in it. That covers a broker restarted empty, a publish lost,
and a submission accepted while the broker was down (committed, answered 201, its token sent later).

Each token carries this deployment's identity (a uuid made with the database, `Deployment`): a worker
whose own database has another identity was pointed at the wrong database, or shares the broker with
another deployment, and leaves the token for the right consumer. A token's Celery task id is the id of
the run whose arrival (or, from the reconciler, whose lack of a token) made it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.admin.models import Deployment
from app.db import enqueue_after_commit, utcnow
from app.queue import TRAIN_TASK, get_celery, queue_depth
from app.submissions.models import Run, RunStatus

log = logging.getLogger("hparena.dispatch")

_uids: dict[str, str] = {}


def deployment_uid(session: Session) -> str:
    """This database's identity; it never changes, so each process reads it once per database."""
    url = session.get_bind().url.render_as_string(hide_password=False)
    if url not in _uids:
        _uids[url] = session.scalars(select(Deployment.uid).where(Deployment.id == 1)).one()
    return _uids[url]


def send_wake(queue: str, deployment: str, run_id: int | None = None) -> bool:
    """Publish one token; False (logged, not raised) when the broker is unreachable: the run is in the
    database as queued, and the reconciler sends its token once the broker is back."""
    try:
        get_celery().send_task(TRAIN_TASK, kwargs={"deployment": deployment}, queue=queue,
                               task_id=None if run_id is None else str(run_id))
        return True
    except Exception as e:  # kombu raises OperationalError, ConnectionError, or the transport's own
        log.warning("broker unreachable, token for queue %s not sent (%s: %s); the reconciler will send it",
                    queue, type(e).__name__, e)
        return False


def wake_after_commit(session: Session, queue: str, run_id: int) -> None:
    """A run was queued (submitted, or requeued by the sweep): wake one worker once the transaction commits."""
    uid = deployment_uid(session)
    enqueue_after_commit(session, lambda: send_wake(queue, uid, run_id))


def reconcile(session: Session, queue: str, grace_seconds: float = 5.0) -> int:
    """Top the broker up to one token per queued run of `queue`; returns how many tokens were sent.

    Runs submitted in the last `grace_seconds` are not counted: their tokens are on their way (published
    just after their commit). A token a worker holds right now is not in the broker's count either, so
    this may still send one more than needed now and then; a spare token costs one empty claim. The
    deployment row is locked while counting and sending, so that workers reconciling at the same moment
    on PostgreSQL don't each send the same missing tokens (SQLite serialises writers anyway).
    """
    session.execute(select(Deployment.id).where(Deployment.id == 1).with_for_update())
    depth = queue_depth(queue)  # under the lock: another worker may just have topped it up
    if depth is None:  # the broker is down: nothing to send to
        return 0
    waiting = (Run.status == RunStatus.queued) & (Run.queue == queue) & (
        Run.created_at < utcnow() - timedelta(seconds=grace_seconds))
    queued = session.scalar(select(func.count()).select_from(Run).where(waiting)) or 0
    missing = queued - depth
    if missing <= 0:
        return 0
    uid = deployment_uid(session)
    # Named after the runs that waited longest: the ones most likely to have lost their token.
    oldest = session.scalars(select(Run.id).where(waiting).order_by(Run.id).limit(missing)).all()
    sent = sum(send_wake(queue, uid, run_id) for run_id in oldest)
    if sent:
        log.warning("queue %s: %d queued runs, %d tokens in the broker; sent %d", queue, queued, depth, sent)
    return sent
