"""The Alembic history runs down and up again on both databases, and matches the models."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app import migrate
from app.db import Base


def test_downgrade_then_upgrade_and_no_drift(database_url):
    migrate.downgrade(database_url, "base")
    engine = create_engine(database_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(database_url)
    assert {"competition", "submission", "run", "epoch_metric", "run_logits", "worker_node"} <= set(
        inspect(engine).get_table_names())
    import app.models  # noqa: F401

    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    engine.dispose()
