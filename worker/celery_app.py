"""The Celery worker: `celery -A worker.celery_app worker -Q train.<hardware_class>`.

The configuration is app.queue's (shared with the API, which only sends). This module adds the tasks
and a fleet heartbeat from the parent process. The parent never touches CUDA: only the task does,
inside the forked child, so the driver is never initialised before a fork.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from app.admin.service import remove_node, upsert_node
from app.config import get_settings
from app.db import session_scope
from app.queue import get_celery

celery = get_celery()
celery.conf.include = ["worker.tasks"]
log = logging.getLogger("hparena.worker")

_stop = threading.Event()


def _queues(sender) -> str:
    try:
        return ",".join(q.name for q in sender.app.amqp.queues.consume_from.values())
    except Exception:
        return get_settings().queue_for(get_settings().hardware_class)


@worker_ready.connect
def _announce(sender, **_):
    hostname, queues = sender.hostname, _queues(sender)

    def beat():
        while not _stop.is_set():
            try:
                with session_scope() as s:
                    upsert_node(s, hostname, queues)
            except Exception:  # the database may be briefly unavailable; try again next beat
                log.exception("fleet heartbeat failed")
            _stop.wait(15)

    threading.Thread(target=beat, name="hparena-fleet-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _goodbye(sender, **_):
    _stop.set()
    try:
        with session_scope() as s:
            remove_node(s, sender.hostname)
    except Exception:
        log.exception("could not deregister worker")
