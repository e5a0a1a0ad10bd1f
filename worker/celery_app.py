"""The Celery worker: `celery -A worker.celery_app worker -Q train.<hardware_class>`.

The configuration is app.queue's (shared with the API, which only sends). This module adds the tasks,
a start-up check of the device against the worker's hardware class, and a beat thread in the parent
process: the fleet heartbeat, the stale-run sweep, the reconciler that keeps a token in the broker for
every queued run (app.dispatch), and the checkpoint clean-up. The parent never touches CUDA: the start-up
check probes the device in a process of its own (worker.probe) and only the task trains, inside the
forked child, so the driver is never initialised before a fork.
"""

from __future__ import annotations

import logging
import shutil
import threading

from celery.signals import celeryd_after_setup, worker_process_init, worker_ready, worker_shutdown

from app.admin.service import remove_node, upsert_node
from app.config import Settings, get_settings
from app.db import dispose_after_fork, session_scope
from app.dispatch import reconcile, wake_after_commit
from app.hardware import check_probe, get_class, thread_share
from app.queue import get_celery
from app.submissions.runs import finished_checkpoints, requeue_stale

celery = get_celery()
celery.conf.include = ["worker.tasks"]
log = logging.getLogger("hparena.worker")

_stop = threading.Event()
# Why this worker must not train (its device is not its class), set by the start-up check in the parent
# before the pool forks, so every child inherits it; None: it may.
_hardware_problem: str | None = None


def hardware_problem() -> str | None:
    return _hardware_problem


def _queues(sender) -> str:
    try:
        return _consumed(sender.app)  # empty when the hardware check refused the train queue
    except Exception:
        return get_settings().queue_for(get_settings().hardware_class)


@worker_process_init.connect
def _fresh_connections(**_):
    # The parent's heartbeat thread opened pooled connections before forking this child; two processes
    # must never share one database socket.
    dispose_after_fork()


@celeryd_after_setup.connect
def _check_hardware(sender, instance, **_):
    """Before the consumer starts: probe the device, read the class this worker serves and compare. On a
    mismatch (or an unknown class, or a check that could not run) the worker stays up but does not consume
    its train queue, and says why in its log (ERROR) and on the fleet table (GET /api/admin/workers)."""
    global _hardware_problem
    settings = get_settings()
    name, queue = settings.hardware_class, settings.queue_for(settings.hardware_class)
    threads = thread_share(settings.worker_threads)
    try:
        problem = _hardware_check(settings)
    except Exception as e:  # fail closed: a worker that could not check must not train
        log.exception("the hardware check failed")
        problem = f"could not check the device against hardware class {name!r}: {type(e).__name__}: {e}"
    if problem is not None:
        _hardware_problem = problem
        instance.app.amqp.queues.deselect([queue])
        log.error("not consuming %s: %s", queue, problem)
    else:
        log.info("device checked against hardware class %r; training with %d threads", name, threads)
    try:
        with session_scope() as s:
            upsert_node(s, sender, _consumed(instance.app), hardware_class=name, threads=threads, problem=problem)
    except Exception:
        log.exception("could not record the hardware check on the fleet table")


def _hardware_check(settings: Settings) -> str | None:
    from worker.probe import run_probe  # the probe module imports no torch; its subprocess does

    probe = run_probe(settings.probe_timeout_seconds)
    with session_scope() as s:
        return check_probe(get_class(s, settings.hardware_class), settings.hardware_class, probe)


def _consumed(app) -> str:
    return ",".join(q.name for q in app.amqp.queues.consume_from.values())


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
                for queue in filter(None, queues.split(",")):  # a broker restarted empty, a publish lost
                    with session_scope() as s:
                        reconcile(s, queue)
                for path in finished:  # runs that ended without a worker to clean up after them
                    shutil.rmtree(path, ignore_errors=True)
            except Exception:  # the database may be briefly unavailable; try again next beat
                log.exception("fleet heartbeat failed")
            _stop.wait(settings.sweep_seconds)

    threading.Thread(target=beat, name="hparena-fleet-heartbeat", daemon=True).start()
    threading.Thread(target=_refresh_boards, name="hparena-board-refresher", daemon=True).start()


def _refresh_boards() -> None:
    """Recompute the cached boards of every competition whose results changed (app.leaderboard.board),
    here in the worker's parent rather than in the training child, so a GPU never idles while a thousand
    entries are banded. Every worker polls; the claim in board.refresh lets one of them do each."""
    from app.leaderboard import board

    settings = get_settings()
    while not _stop.is_set():
        try:
            for competition_id in board.refresh_stale():
                log.info("refreshed the boards of competition %s", competition_id)
        except Exception:  # the database may be briefly unavailable; try again next poll
            log.exception("board refresh failed")
        _stop.wait(settings.board_refresh_seconds)


@worker_shutdown.connect
def _goodbye(sender, **_):
    _stop.set()
    try:
        with session_scope() as s:
            remove_node(s, sender.hostname)
    except Exception:
        log.exception("could not deregister worker")
