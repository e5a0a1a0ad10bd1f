"""The Celery worker: `celery -A worker.celery_app worker -Q train.<hardware_class>`.

The configuration is app.queue's (shared with the API, which only sends). This module adds the tasks
and a beat thread in the parent process: the fleet heartbeat, the stale-run sweep, the reconciler that
keeps a token in the broker for every queued run (app.dispatch), and the checkpoint clean-up. The parent
never touches CUDA: only the task does, inside the forked child, so the driver is never initialised
before a fork.
"""

from __future__ import annotations

import logging
import shutil
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from app.admin.service import remove_node, upsert_node
from app.config import get_settings
from app.db import dispose_after_fork, session_scope
from app.dispatch import reconcile, wake_after_commit
from app.queue import get_celery
from app.submissions.runs import finished_checkpoints, requeue_stale

celery = get_celery()
celery.conf.include = ["worker.tasks"]
log = logging.getLogger("hparena.worker")

_stop = threading.Event()


def _queues(sender) -> str:
    try:
        return ",".join(q.name for q in sender.app.amqp.queues.consume_from.values())
    except Exception:
        return get_settings().queue_for(get_settings().hardware_class)


@worker_process_init.connect
def _fresh_connections(**_):
    # The parent's heartbeat thread opened pooled connections before forking this child; two processes
    # must never share one database socket.
    dispose_after_fork()


@worker_ready.connect
def _announce(sender, **_):
    hostname, queues = sender.hostname, _queues(sender)

    def beat():
        settings = get_settings()
        while not _stop.is_set():
            try:
                with session_scope() as s:
                    upsert_node(s, hostname, queues)
                    for run_id, queue in requeue_stale(s, stale_after=settings.stale_after_seconds,
                                                       max_attempts=settings.max_attempts):
                        log.warning("run %s lost its worker; requeued on %s", run_id, queue)
                        wake_after_commit(s, queue, run_id)
                    finished = finished_checkpoints(s, settings.checkpoint_dir)
                for queue in queues.split(","):  # a broker restarted empty, a publish lost: tokens again
                    with session_scope() as s:
                        reconcile(s, queue)
                for path in finished:  # runs that ended without a worker to clean up after them
                    shutil.rmtree(path, ignore_errors=True)
            except Exception:  # the database may be briefly unavailable; try again next beat
                log.exception("fleet heartbeat failed")
            _stop.wait(settings.sweep_seconds)

    threading.Thread(target=beat, name="hparena-fleet-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _goodbye(sender, **_):
    _stop.set()
    try:
        with session_scope() as s:
            remove_node(s, sender.hostname)
    except Exception:
        log.exception("could not deregister worker")
