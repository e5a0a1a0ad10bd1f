"""The e2e stack: uvicorn API + Celery worker (prefork) on a real broker and a real database, both kinds."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from tests.conftest import _drop_pg_database, _pg_database
from tests.e2e.services import free_port
from tests.factories import cpu_class
from worker.processes import spawn, stop, wait_http

REDIS_URL = os.environ.get("HPARENA_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.fixture
def stack_env() -> dict[str, str]:
    """Settings a test module adds to every process of its stack: override this fixture in the module."""
    return {}


@pytest.fixture(params=["filesystem+sqlite", "redis+postgresql"])
def stack(request, tmp_path, tiny_cifar, stack_env):
    broker, db = request.param.split("+")
    hw = f"e2e{uuid.uuid4().hex[:6]}"  # a queue of its own, so parallel runs never share messages
    pg_name = None
    if db == "sqlite":
        db_url = f"sqlite:///{tmp_path / 'e2e.db'}"
    else:
        pg_name = f"hparena_e2e_{uuid.uuid4().hex[:8]}"
        db_url = _pg_database(pg_name)
    env = {
        **os.environ,
        "HPARENA_DATABASE_URL": db_url,
        "HPARENA_BROKER_URL": "filesystem://" if broker == "filesystem" else REDIS_URL,
        "HPARENA_VAR_DIR": str(tmp_path / "var"),
        "HPARENA_DATA_DIR": str(tmp_path / "data"),
        "HPARENA_ADMIN_TOKEN": "e2e-admin-token",
        "HPARENA_HARDWARE_CLASS": hw,
        "HPARENA_DEVICE": "cpu",
        "HPARENA_HEARTBEAT_SECONDS": "1",
        # Well above the heartbeat and the parent's 1 s worker_lost_wait, so that on a loaded machine a live
        # run is never swept as lost, and a dead child is reported by its own parent first.
        "HPARENA_STALE_AFTER_SECONDS": "15",
        "HPARENA_SWEEP_SECONDS": "1",
        **stack_env,
    }
    port = free_port()
    from app import migrate

    migrate.upgrade(db_url)
    cpu_class(db_url, hw)  # before the worker starts: it checks its device against its class
    old = dict(os.environ)
    os.environ.update(env)
    procs = []
    try:
        procs.append(spawn([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)],
                           tmp_path / "api.log"))
        procs.append(spawn([sys.executable, "-m", "worker.cli", "worker", "--hostname", f"{hw}@%h"],
                           tmp_path / "worker.log"))
        wait_http(f"http://127.0.0.1:{port}/api/health")
        def start_worker(name: str):
            procs.append(spawn([sys.executable, "-m", "worker.cli", "worker", "--hostname", f"{name}@%h"],
                               tmp_path / f"{name}.log"))
            return procs[-1]

        yield {"url": f"http://127.0.0.1:{port}", "hw": hw, "tiny": tiny_cifar, "logs": tmp_path, "procs": procs,
               "start_worker": start_worker}
    finally:
        for p in procs:
            stop(p)
        os.environ.clear()
        os.environ.update(old)
        if pg_name:
            _drop_pg_database(pg_name)
