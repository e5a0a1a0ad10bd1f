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


def test_production_refuses_default_secret_and_sqlite(monkeypatch):
    monkeypatch.setenv("HPARENA_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="HPARENA_ADMIN_TOKEN"):
        Settings()
    monkeypatch.setenv("HPARENA_ADMIN_TOKEN", "x" * 40)
    with pytest.raises(ValidationError, match="server database"):
        Settings()
    monkeypatch.setenv("HPARENA_DATABASE_URL", "postgresql+psycopg://u@db/hparena")
    assert Settings().environment == "production"
