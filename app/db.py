"""Database engine, sessions and the declarative base.

The request's session owns the transaction: `get_session` commits on success and rolls back on error;
services only flush. Celery messages queued during a request (`enqueue_after_commit`) are sent after the
commit and dropped on rollback, so a worker never sees a run the database does not have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from pydantic import BaseModel
from sqlalchemy import JSON, DateTime, MetaData, TypeDecorator, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from app.config import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# Added to the real time by utcnow: what tests move to cross a competition's freeze or deadline (tests/conftest's
# `clock` fixture). Always zero in a running server.
CLOCK_OFFSET = [timedelta(0)]


def utcnow() -> datetime:
    return datetime.now(UTC) + CLOCK_OFFSET[0]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware, on SQLite (which keeps no offset)
    as on PostgreSQL, so every datetime the API returns carries its offset (RFC 3339)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones.
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class PydanticJSON(TypeDecorator):
    """A pydantic model stored as JSON and read back as that model, so a typed value stays typed through
    the database (a RunSpec goes in, a RunSpec comes out)."""

    impl = JSON
    cache_ok = True

    def __init__(self, model: type[BaseModel]):
        super().__init__()
        self.model = model

    def process_bind_param(self, value: BaseModel | None, dialect):
        return None if value is None else self.model.model_validate(value).model_dump(mode="json")

    def process_result_value(self, value, dialect) -> BaseModel | None:
        return None if value is None else self.model.model_validate(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str | None = None) -> Engine:
    """One engine (and pool) per URL per process."""
    url = url or get_settings().database_url
    if url not in _ENGINES:
        _ENGINES[url] = _make_engine(url)
    return _ENGINES[url]


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # API and worker processes share the file
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


def session_factory() -> sessionmaker[Session]:
    return _sessionmaker(get_settings().database_url)


def close_engine(url: str) -> None:
    """Close a URL's pool (before dropping its database, say)."""
    engine = _ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()
    _sessionmaker.cache_clear()


def dispose_after_fork() -> None:
    """In a forked child: drop the pool inherited from the parent without closing the parent's sockets."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)


def upsert_insert(bind: Engine | Connection, table):
    """`INSERT` with `.on_conflict_do_update/_nothing` for this database (PostgreSQL's or SQLite's)."""
    return (postgresql.insert if bind.dialect.name == "postgresql" else sqlite.insert)(table)


def enqueue_after_commit(session: Session, send: Callable[[], None]) -> None:
    session.info.setdefault("after_commit", []).append(send)


def _flush_after_commit(session: Session) -> None:
    for send in session.info.pop("after_commit", []):
        send()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work outside a request (worker, CLI, demo): commit, then send queued messages."""
    session = session_factory()()
    try:
        yield session
        session.commit()
        _flush_after_commit(session)
    except BaseException:
        session.rollback()
        session.info.pop("after_commit", None)
        raise
    finally:
        session.close()


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session
