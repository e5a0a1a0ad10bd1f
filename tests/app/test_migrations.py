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


def test_0003_gives_runs_from_before_the_spec_they_were_submitted_with(client, db, admin_headers, database_url):
    """A run stored before 0003 had no spec: the upgrade builds it from the submission and competition,
    exactly as create_submission does now."""
    from sqlalchemy import select

    from app.submissions.models import Run
    from tests.factories import join, make_competition, make_organizer

    comp = make_competition(client, make_organizer(client, admin_headers), seeds=[0, 7])
    student = join(client, comp["slug"])
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"lr": 0.05, "batch_size": 32}},
                    headers=student)
    assert r.status_code == 201, r.text
    before = {run.seed: (run.spec, run.spec_hash) for run in db.scalars(select(Run))}
    db.close()
    migrate.downgrade(database_url, "0002")
    migrate.upgrade(database_url)
    db.expire_all()
    after = {run.seed: (run.spec, run.spec_hash) for run in db.scalars(select(Run))}
    assert after == before and set(after) == {0, 7}
    assert after[0][0].config.lr == 0.05 and after[0][0].config.epochs == 3  # unset: the whole budget


def test_0009_fills_precision_and_setup_seconds_from_the_results_already_stored(client, db, admin_headers,
                                                                              database_url):
    """Runs that ended before 0009 keep their precision and setup time in their result record only: the upgrade
    copies both onto the row, where a running run now reports them; a run without a result stays blank."""
    from sqlalchemy import select, update

    from app.submissions.models import Run
    from tests.factories import join, make_competition, make_organizer, submit

    comp = make_competition(client, make_organizer(client, admin_headers), seeds=[0, 7])
    submit(client, comp, join(client, comp["slug"]), lr=0.05, batch_size=32)
    ended, waiting = db.scalars(select(Run.id).order_by(Run.seed)).all()
    db.execute(update(Run).where(Run.id == ended).values(
        result={"precision": "bf16", "timings": {"setup_seconds": 1.25, "train_seconds": 30.0}}))
    db.commit()
    db.close()
    migrate.downgrade(database_url, "0008")
    migrate.upgrade(database_url)
    db.expire_all()
    rows = {r.id: (r.precision, r.setup_seconds) for r in db.scalars(select(Run))}
    assert rows == {ended: ("bf16", 1.25), waiting: (None, None)}
