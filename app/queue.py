"""The Celery app's configuration, shared by the API (which only sends) and the worker (which consumes).

The API never imports the worker's code: it sends tasks by name. Settings follow Celery's advice for
long GPU jobs (see the comments); `worker.celery_app` adds the task modules to this same app.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

TRAIN_TASK = "hparena.train_run"


def celery_config(settings: Settings) -> dict:
    transport_options: dict = {
        # Redis redelivers an unacked message after this many seconds; a run longer than this would be
        # handed to a second worker while the first still trains, so it must exceed the longest budget.
        "visibility_timeout": settings.visibility_timeout_seconds,
    }
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_dir
        for sub in ("queue", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options.update(
            data_folder_in=str(folder / "queue"),
            data_folder_out=str(folder / "queue"),
            processed_folder=str(folder / "processed"),
            store_processed=False,
        )
        (folder / "control").mkdir(parents=True, exist_ok=True)
        transport_options["control_folder"] = str(folder / "control")
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # Results live in the SQL database, written by the task itself; no result backend.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Late ack + reject_on_worker_lost: a killed worker's message is redelivered, not lost. The task's
        # guarded claim makes the redelivery harmless when the run already finished.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # How long the parent waits for a dead child's result before it reports the child lost (default
        # 10 s). This task writes its result to SQL, not through the pool, so there is nothing to wait for;
        # the parent should record the crash and requeue before the stale-heartbeat sweep acts.
        "worker_lost_wait": 1.0,
        # Each run's own soft and hard limits are set by the task after its claim (a token names no run, so
        # a message can't carry them; see worker.tasks). This is the parent's backstop above all of them, for
        # a child whose watchdog is stuck too: the child is killed, the message acked, the run swept back.
        "task_time_limit": settings.task_time_limit_seconds,
        # One message at a time per process: a GPU job must not sit prefetched behind another GPU job.
        "worker_prefetch_multiplier": 1,
        # One process per GPU.
        "worker_concurrency": 1,
        "worker_pool": "prefork",
        "task_default_queue": settings.queue_for(settings.hardware_class),
        "task_queues": [Queue(settings.queue_for(settings.hardware_class))],
        "task_create_missing_queues": True,
        # A publish to a broker that is down fails within about a second instead of holding the request:
        # the run is committed as queued either way, and the reconciler (app.dispatch) sends its token later.
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                      "interval_max": 0.5},
        # Task events for Flower (HPARENA_TASK_EVENTS; docs/operations.md, "Flower"): the worker's received,
        # started and finished, and the sender's task-sent. Settings refuses them on the filesystem broker.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        # A run keeps training when the broker connection drops: the database, not the broker, says whose
        # run it is (Celery 6 would otherwise default to cancelling it).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
    }


@lru_cache(maxsize=4)
def _celery_for(broker_url: str) -> Celery:
    app = Celery("hparena")
    app.conf.update(celery_config(get_settings()))
    return app


def get_celery() -> Celery:
    return _celery_for(get_settings().broker_url)


def queue_depth(queue: str) -> int | None:
    """Messages waiting in the broker for this queue, not counting those a worker holds (None: the broker
    can't be reached). Declaring is idempotent; a passive declare would call an empty Redis queue (no key
    at all, say after a restart) missing instead of empty."""
    try:
        # One quick try: the admin view and the reconciler must not hang on a broker that is down.
        with get_celery().connection_for_write(connect_timeout=1,
                                               transport_options={"max_retries": 0}) as conn:
            return conn.default_channel.queue_declare(queue=queue).message_count
    except Exception:  # a broker that is down
        return None
