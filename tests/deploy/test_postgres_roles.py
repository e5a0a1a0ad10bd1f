"""deploy/postgres: the init script's three roles on the real local PostgreSQL. The owner migrates, the API
role takes a submission over HTTP, the worker role trains and reports it (the Celery task, run in this process
as a worker's child would), and neither service role can change the schema. Tables a later migration adds are
granted by the default privileges. Roles are cluster-wide, so every name here is unique to the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from tests.conftest import PG_ADMIN_URL, reset_caches

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVER = PG_ADMIN_URL.split("://", 1)[1].split("@", 1)[1].rsplit("/", 1)[0]  # host:port


def _url(user: str, password: str, db: str) -> str:
    return f"postgresql+psycopg://{user}:{password}@{SERVER}/{db}"


def _superuser_env() -> dict[str, str]:
    rest = PG_ADMIN_URL.split("://", 1)[1]
    user, hostport = rest.split("@", 1)[0].split(":")[0], rest.split("@", 1)[1].rsplit("/", 1)[0]
    host, _, port = hostport.partition(":")
    return {"POSTGRES_USER": user, "PGHOST": host, "PGPORT": port or "5432"}


@pytest.fixture
def roles():
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    s = uuid.uuid4().hex[:8]
    names = {"db": f"hparena_roles_{s}", "owner": f"hparena_owner_{s}", "api": f"hparena_api_{s}",
             "worker": f"hparena_worker_{s}"}
    env = {**os.environ, **_superuser_env(), "ROLES_PSQL": str(ROOT / "deploy/postgres/roles.psql"),
           "DB_NAME": names["db"], "DB_OWNER": names["owner"], "DB_API_USER": names["api"],
           "DB_WORKER_USER": names["worker"], "DB_OWNER_PASSWORD": "owner-pw", "DB_API_PASSWORD": "api-pw",
           "DB_WORKER_PASSWORD": "worker-pw"}
    script = [str(ROOT / "deploy/postgres/init-roles.sh")]
    try:
        for _ in range(2):  # a second run (a re-applied init) must succeed and change nothing
            done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
        yield {k: _url(names[k], f"{k}-pw", names["db"]) for k in ("owner", "api", "worker")}
    finally:
        from app.db import close_engine

        for k in ("owner", "api", "worker"):
            close_engine(_url(names[k], f"{k}-pw", names["db"]))
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{names["db"]}" WITH (FORCE)'))
            for k in ("api", "worker", "owner"):
                c.execute(text(f'DROP ROLE IF EXISTS "{names[k]}"'))
        admin.dispose()


def _as(url: str, sql: str, **params):
    engine = create_engine(url)
    try:
        with engine.begin() as c:
            return c.execute(text(sql), params).all() if sql.lstrip().upper().startswith("SELECT") else \
                c.execute(text(sql), params)
    finally:
        engine.dispose()


def test_owner_migrates_api_and_worker_roles_serve_a_submission_and_cannot_change_the_schema(
        roles, monkeypatch, tmp_path, tiny_cifar):
    from fastapi.testclient import TestClient

    from app import migrate
    from app.main import create_app
    from tests.factories import join, make_competition, make_organizer

    migrate.upgrade(roles["owner"])
    migrate.upgrade(roles["api"])  # `hparena api` upgrades before it serves: at head, the API role may

    for key, value in {"HPARENA_VAR_DIR": str(tmp_path / "var"), "HPARENA_DATA_DIR": str(tmp_path / "data"),
                       "HPARENA_BROKER_URL": "filesystem://", "HPARENA_ADMIN_TOKEN": "roles-admin-token",
                       "HPARENA_DEVICE": "cpu", "HPARENA_DATABASE_URL": roles["api"]}.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    admin = {"Authorization": "Bearer roles-admin-token"}
    with TestClient(create_app()) as client:
        org = make_organizer(client, admin)
        comp = make_competition(client, org, seeds=[0], budget={"max_epochs": 1},
                                dataset={"name": "cifar10", "path": str(tiny_cifar)})
        student = join(client, comp["slug"])
        r = client.post(f"/api/competitions/{comp['slug']}/submissions", headers=student,
                        json={"config": {"batch_size": 32}})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

        monkeypatch.setenv("HPARENA_DATABASE_URL", roles["worker"])
        reset_caches()
        from worker.tasks import train_run

        train_run.apply().get()  # claim, heartbeat, epochs, result, logits: all as the worker role

        monkeypatch.setenv("HPARENA_DATABASE_URL", roles["api"])
        reset_caches()
        detail = client.get(f"/api/submissions/{sid}", headers=student).json()
        assert detail["status"] == "succeeded", detail
        assert client.get(f"/api/competitions/{comp['slug']}/leaderboard").json()["entries"]
    reset_caches()

    for role in ("api", "worker"):
        with pytest.raises(ProgrammingError, match="permission denied"):
            _as(roles[role], "CREATE TABLE intruder (id int)")
        with pytest.raises(ProgrammingError, match="must be owner"):
            _as(roles[role], "ALTER TABLE run ADD COLUMN intruder int")
        with pytest.raises(ProgrammingError, match="must be owner"):
            _as(roles[role], "DROP TABLE epoch_metric")

    # A table a later migration creates (as the owner) is usable by both services without another grant.
    _as(roles["owner"], "CREATE TABLE later_table (id serial PRIMARY KEY, note text)")
    _as(roles["api"], "INSERT INTO later_table (note) VALUES ('api')")
    _as(roles["worker"], "UPDATE later_table SET note = 'worker' WHERE note = 'api'")
    assert _as(roles["api"], "SELECT note FROM later_table") == [("worker",)]
