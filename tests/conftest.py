"""Shared fixtures: real databases (SQLite and PostgreSQL), the schema built by Alembic, an HTTP client.

Every test that takes `client` or `db` runs once per database. Between tests the tables are emptied.
Set HPARENA_TEST_DATABASES=sqlite (or postgresql) to run one of them only.
"""

from __future__ import annotations

import os
import tarfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get("HPARENA_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SHARED_TAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpg.tar.gz"
DATABASES = os.environ.get("HPARENA_TEST_DATABASES", "sqlite,postgresql").split(",")


def reset_caches() -> None:
    from app.config import get_settings
    from app.queue import _celery_for

    get_settings.cache_clear()
    _celery_for.cache_clear()


@pytest.fixture(scope="session")
def var_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A small class-balanced tarball cut from the real CIFAR-10 JPEGs: 30 train, 10 test per class."""
    out = tmp_path_factory.mktemp("data") / "cifar10-tiny.tar.gz"
    want = {"train": 30, "test": 10}
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(SHARED_TAR) as src, tarfile.open(out, "w:gz") as dst:
        for m in src:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split not in want or taken.get((split, cls), 0) >= want[split]:
                continue
            taken[(split, cls)] = taken.get((split, cls), 0) + 1
            dst.addfile(m, src.extractfile(m))
    return out


def _pg_database(name: str) -> str:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_pg_database(name: str) -> None:
    from app.db import close_engine

    close_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session", params=DATABASES)
def database_url(request, var_dir) -> str:
    """A fresh database of each kind, built with `alembic upgrade head` (which tests the migration)."""
    from app import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{var_dir / f'test-{uuid.uuid4().hex[:8]}.db'}"
        migrate.upgrade(url)
        yield url
    else:
        name = f"hparena_test_{uuid.uuid4().hex[:8]}"
        url = _pg_database(name)
        migrate.upgrade(url)
        yield url
        _drop_pg_database(name)


@pytest.fixture
def settings_env(monkeypatch, database_url, var_dir, tiny_cifar):
    """Point the app at the test database, a per-test embedded broker and the tiny dataset."""
    run_dir = var_dir / uuid.uuid4().hex[:8]
    monkeypatch.setenv("HPARENA_DATABASE_URL", database_url)
    monkeypatch.setenv("HPARENA_VAR_DIR", str(run_dir))
    monkeypatch.setenv("HPARENA_DATA_DIR", str(var_dir / "data-cache"))
    monkeypatch.setenv("HPARENA_BROKER_URL", "filesystem://")
    monkeypatch.setenv("HPARENA_ADMIN_TOKEN", "test-admin-token")
    monkeypatch.setenv("HPARENA_DEVICE", "cpu")
    # No worker polls for stale boards in API tests: a request refreshes them itself (tests/app/test_boards.py
    # covers the grace a deployment with workers runs under).
    monkeypatch.setenv("HPARENA_BOARD_STALE_GRACE_SECONDS", "0")
    reset_caches()
    yield run_dir
    reset_caches()


@pytest.fixture
def db(settings_env, database_url):
    """A session on the test database; tables are emptied after the test."""
    from app.db import session_factory

    session = session_factory()()
    yield session
    session.close()
    _empty_tables(database_url)


def _empty_tables(url: str) -> None:
    from app.db import Base, get_engine

    engine = get_engine(url)
    # The deployment's identity and the seeded hardware classes are made by the migrations, once per
    # database, like the schema itself (a test that edits a class puts it back).
    tables = [t for t in Base.metadata.sorted_tables if t.name not in ("deployment", "hardware_class")]
    with engine.begin() as conn:
        if url.startswith("postgresql"):
            names = ", ".join(f'"{t.name}"' for t in tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for t in reversed(tables):
                conn.execute(t.delete())


@pytest.fixture
def client(db):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def clock():
    """Move utcnow() by an offset (the whole app reads time through it): clock(timedelta(hours=2)). Put back
    after the test."""
    from app import db as app_db

    def move(delta: timedelta) -> None:
        app_db.CLOCK_OFFSET[0] = delta
    yield move
    app_db.CLOCK_OFFSET[0] = timedelta(0)


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": "Bearer test-admin-token"}
