from __future__ import annotations

from alembic import context
from sqlalchemy import pool

import app.models  # noqa: F401  (registers every table on Base.metadata)
from app.config import get_settings
from app.db import Base, get_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.attributes.get("url")
        or get_settings().database_url
    )


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = _url()
    engine = get_engine(url) if url.startswith("sqlite") else None
    if engine is None:
        from sqlalchemy import create_engine

        engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            _run_sqlite(conn)
        else:
            _run(conn)
            conn.commit()


def _run_sqlite(conn) -> None:
    """Batch mode rebuilds a table by copy, drop and rename. With foreign keys enforced (app.db turns them
    on for every connection) the drop fails as soon as another table's rows point at it, so they are off
    while migrating (the pragma only takes effect outside a transaction) and checked before they go back on."""
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        _run(conn)
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:  # rolled back below: the database stays as it was
            raise RuntimeError(f"migration left rows pointing at missing rows: {broken[:5]}")
        conn.commit()
    finally:
        conn.rollback()
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")


def _run(connection) -> None:
    # render_as_batch: SQLite can't ALTER most things; batch mode rebuilds tables there.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
