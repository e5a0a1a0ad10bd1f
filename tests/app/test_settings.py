import pytest
from pydantic import ValidationError

from app.config import Settings


def test_defaults_are_embedded(monkeypatch, tmp_path):
    monkeypatch.setenv("HPARENA_VAR_DIR", str(tmp_path))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'hparena.db'}"
    assert s.broker_url == "filesystem://"
    assert s.data_dir == tmp_path / "data"
    assert s.queue_for("gpu") == "train.gpu"


def test_production_refuses_sqlite_and_the_api_refuses_the_default_admin_token(monkeypatch):
    monkeypatch.setenv("HPARENA_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="server database"):
        Settings()
    monkeypatch.setenv("HPARENA_DATABASE_URL", "postgresql+psycopg://u@db/hparena")
    # A worker or a migration loads its settings without the admin token: their nodes need not hold it.
    settings = Settings()
    assert settings.environment == "production"
    # The API, which keys the bootstrap admin to it, refuses to start with the default or a short one.
    with pytest.raises(ValueError, match="HPARENA_ADMIN_TOKEN"):
        settings.admin_secret()
    monkeypatch.setenv("HPARENA_ADMIN_TOKEN", "short")
    with pytest.raises(ValueError, match="HPARENA_ADMIN_TOKEN"):
        Settings().admin_secret()
    monkeypatch.setenv("HPARENA_ADMIN_TOKEN", "x" * 40)
    assert Settings().admin_secret() == "x" * 40


def test_the_api_does_not_start_in_production_with_the_default_admin_token(monkeypatch):
    from fastapi.testclient import TestClient

    from app.config import get_settings
    from app.main import create_app

    monkeypatch.setenv("HPARENA_ENVIRONMENT", "production")
    monkeypatch.setenv("HPARENA_DATABASE_URL", "postgresql+psycopg://u@db/hparena")
    monkeypatch.delenv("HPARENA_ADMIN_TOKEN", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ValueError, match="HPARENA_ADMIN_TOKEN"), TestClient(create_app()):
            pass
    finally:
        get_settings.cache_clear()
