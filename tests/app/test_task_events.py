"""HPARENA_TASK_EVENTS: Celery's task events for Flower, off by default, refused on the embedded broker.
tests/e2e/test_task_events.py watches them flow through a real worker on Redis."""

from __future__ import annotations

import pytest
from celery import Celery
from pydantic import ValidationError

from app.config import Settings
from app.queue import celery_config


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("HPARENA_BROKER_URL", "HPARENA_TASK_EVENTS", "HPARENA_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HPARENA_VAR_DIR", str(tmp_path))


def _celery(settings: Settings) -> Celery:
    app = Celery("hparena-test")
    app.conf.update(celery_config(settings))
    return app


def test_task_events_are_off_by_default_and_the_setting_turns_them_on_in_workers_and_senders(clean_env,
                                                                                            monkeypatch):
    monkeypatch.setenv("HPARENA_BROKER_URL", "redis://redis:6379/0")
    off = _celery(Settings(_env_file=None)).conf
    assert (off.worker_send_task_events, off.task_send_sent_event) == (False, False)
    monkeypatch.setenv("HPARENA_TASK_EVENTS", "true")
    # Read back through Celery's own settings: a misspelt key would be kept aside and the default read.
    on = _celery(Settings(_env_file=None)).conf
    assert (on.worker_send_task_events, on.task_send_sent_event) == (True, True)


def test_the_embedded_broker_refuses_task_events_and_says_why(clean_env):
    with pytest.raises(ValidationError, match="refused on the embedded filesystem broker.*monitor's event queue"):
        Settings(_env_file=None, task_events=True)


def test_why_the_embedded_broker_refuses_them_a_monitors_event_queue_outlives_the_monitor(clean_env):
    """The reason for the refusal, checked against the installed kombu. Events do flow on its filesystem transport,
    but it ignores auto_delete: the queue a monitor (Flower, `celery events`) binds stays bound after the monitor
    has gone, and every later event is written into the broker's queue folder for nobody. Should kombu start
    deleting it, this fails, and the refusal in app.config can be reconsidered."""
    settings = Settings(_env_file=None)
    app = _celery(settings)
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={})
        with receiver.consumer_context(wakeup=False):
            pass  # bound, then gone as a monitor goes: its consumer cancelled, its connection closed
    with app.connection_for_write() as conn:
        for _ in range(3):
            app.events.Dispatcher(conn, hostname="w@h").send("worker-heartbeat")
    left = list((settings.broker_dir / "queue").glob(f"*.{receiver.queue.name}.msg"))
    assert len(left) == 3
