"""Shared fixtures: real databases (SQLite and PostgreSQL), the schema built by Alembic, an HTTP client.

Every test that takes `client` or `db` runs once per database. Between tests the tables are emptied.
Set HPARENA_TEST_DATABASES=sqlite (or postgresql) to run one of them only.
"""

from __future__ import annotations

import functools
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


def pytest_collection_modifyitems(items) -> None:
    """The PostgreSQL copy of every test that runs on both databases is a slow one: the quick loop
    (`-m "not slow"`) checks each behaviour once, on SQLite, and the full suite (CI) on both."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("database_url") == "postgresql":
            item.add_marker(pytest.mark.slow)


# Modules whose every test is slow and whose collection alone is costly: the contract test's schemathesis
# builds its cases when collected (~5 s). A run whose -m leaves slow tests out doesn't collect them.
SLOW_ONLY_MODULES = {"test_contract.py"}


def pytest_ignore_collect(collection_path, config) -> bool | None:
    from _pytest.mark.expression import Expression

    markexpr = config.getoption("markexpr")
    if collection_path.name in SLOW_ONLY_MODULES and markexpr:
        if not Expression.compile(markexpr).evaluate(lambda name, **_: name == "slow"):
            return True
    return None


def reset_caches() -> None:
    from app.config import get_settings
    from app.queue import _celery_for

    get_settings.cache_clear()
    _celery_for.cache_clear()


@pytest.fixture(scope="session")
def var_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="session")
def tiny_cifar(request, tmp_path_factory) -> Path:
    """A small class-balanced tarball cut from the real CIFAR-10 JPEGs: 30 train, 10 test per class. Cutting
    it reads the whole 60,000-file archive (~8 s), so it is kept in pytest's cache folder between sessions
    (when the cache is on), under a name that changes with the archive."""
    st = SHARED_TAR.stat()
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir("tiny-cifar") if cache is not None else tmp_path_factory.mktemp("data")
    out = folder / f"cifar10-tiny-{st.st_size}-{st.st_mtime_ns}.tar.gz"
    if not out.exists():
        part = out.with_name(f"{out.name}.{uuid.uuid4().hex}.part")
        try:
            _cut_tiny_cifar(part)
            part.replace(out)  # atomic: a parallel session sees the whole file or none
        finally:
            part.unlink(missing_ok=True)
    return out


def _cut_tiny_cifar(out: Path) -> None:
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
        # Row by row, children first: on a test's handful of rows this is several times faster than a
        # TRUNCATE, which recreates every table's files (~0.14 s a test on PostgreSQL).
        for t in reversed(tables):
            conn.execute(t.delete())
        if url.startswith("postgresql"):  # ids start at 1 again, as in a fresh database
            for seq in _sequences(url, tuple(t.name for t in tables if "id" in t.c)):
                conn.execute(text("SELECT setval(:seq, 1, false)"), {"seq": seq})


@functools.lru_cache
def _sequences(url: str, tables: tuple[str, ...]) -> list[str]:
    from app.db import get_engine

    with get_engine(url).connect() as conn:
        found = [conn.scalar(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": f'"{t}"'}) for t in tables]
    return [seq for seq in found if seq]


@pytest.fixture
def client(db):
    """An HTTP client on the app. Each test enters the app afresh (its lifespan runs), but the app object is
    built once per body-size limit, the only setting create_app reads: FastAPI builds each route's
    dependency state on an app's first requests, ~0.1 s a test otherwise."""
    from fastapi.testclient import TestClient

    with TestClient(_app(_max_body_bytes())) as c:
        yield c


def _max_body_bytes() -> int:
    from app.config import get_settings

    return get_settings().max_body_bytes


@functools.lru_cache
def _app(_max_body_bytes: int):
    from app.main import create_app

    return create_app()


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
