"""`hparena train`: the engine run locally from a YAML file, as a student checks a config."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from worker.cli import cli

runner = CliRunner()


@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    from app.config import get_settings

    monkeypatch.setenv("HPARENA_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("HPARENA_DATA_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.mark.slow
def test_train_writes_the_result_json(cli_env, tiny_cifar):
    cfg = cli_env / "my.yaml"
    cfg.write_text("model: {width: 8}\nbudget: {max_epochs: 2}\n"
                   "config: {lr: 0.05, batch_size: 32, epochs: 2, ema_decay: 0.9, tta: flip}\n")
    out = cli_env / "result.json"
    r = runner.invoke(cli, ["train", str(cfg), "--data", str(tiny_cifar), "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["status"] == "succeeded" and result["epochs_completed"] == 2
    assert result["evaluated_weights"] == "ema"
    assert result["spec"]["config"]["lr"] == 0.05
    assert result["dataset"]["train"] == 300 and result["dataset"]["test"] == 100
    assert "epoch 2/2" in r.output and "accuracy (public half)" in r.output


@pytest.mark.slow
def test_bare_hyperparameter_file_and_epoch_override(cli_env, tiny_cifar):
    cfg = cli_env / "hp.yaml"
    cfg.write_text("lr: 0.05\nbatch_size: 50\n")
    out = cli_env / "r.json"
    r = runner.invoke(cli, ["train", str(cfg), "--data", str(tiny_cifar), "--device", "cpu", "--epochs", "1",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["epochs_planned"] == 1


def test_invalid_config_names_the_field(cli_env):
    cfg = cli_env / "bad.yaml"
    cfg.write_text("config: {lr: -1, optimiser: sgd}\n")
    r = runner.invoke(cli, ["train", str(cfg)])
    assert r.exit_code == 2
    assert "config.lr" in r.output and "config.optimiser" in r.output


def test_missing_dataset_is_a_clear_error(cli_env):
    cfg = cli_env / "ok.yaml"
    cfg.write_text("lr: 0.1\n")
    r = runner.invoke(cli, ["train", str(cfg), "--data", str(cli_env / "nowhere")])
    assert r.exit_code == 2
    assert "does not exist" in " ".join(r.output.split())


@pytest.mark.slow
def test_train_resumes_from_a_checkpoint_dir(cli_env, tiny_cifar):
    from worker.cli import load_run_spec
    from worker.engine.data import load_dataset
    from worker.engine.result import EpochEvent
    from worker.engine.train import train

    cfg = cli_env / "my.yaml"
    cfg.write_text("model: {width: 8}\nbudget: {max_epochs: 2}\nconfig: {lr: 0.05, batch_size: 32, epochs: 2}\n")
    ckpt = cli_env / "ckpt"
    spec = load_run_spec(cfg, str(tiny_cifar), None)

    def interrupted(e):
        if isinstance(e, EpochEvent) and e.epoch == 1:
            raise KeyboardInterrupt  # the student pressed Ctrl-C after the first epoch

    with pytest.raises(KeyboardInterrupt):
        train(spec, load_dataset(spec.data, cli_env / "cache"), "cpu", interrupted, checkpoint_dir=ckpt)
    out = cli_env / "result.json"
    r = runner.invoke(cli, ["train", str(cfg), "--data", str(tiny_cifar), "--device", "cpu", "--out", str(out),
                            "--checkpoint-dir", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert "1 epoch(s) already trained" in r.output and "epoch 2/2" in r.output
    assert json.loads(out.read_text())["resumed"]["epochs"] == 1
    assert not ckpt.exists()


@pytest.mark.slow
def test_api_with_several_processes_serves_on_one_port(tmp_path):
    """`hparena api --workers 2` (app.serve): both processes accept on the one listener they share."""
    import os
    import socket
    import sys

    import httpx

    from worker.processes import spawn, stop, wait_http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HPARENA_VAR_DIR": str(tmp_path / "var"), "HPARENA_DATABASE_URL": "",
           "HPARENA_BROKER_URL": "filesystem://"}
    proc = spawn([sys.executable, "-m", "worker.cli", "api", "--port", str(port), "--workers", "2"],
                 tmp_path / "api.log", env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:  # one keep-alive connection
            assert {http.get("/api/health").status_code for _ in range(20)} == {200}
        assert "Started parent process" in (tmp_path / "api.log").read_text()
    finally:
        stop(proc)
