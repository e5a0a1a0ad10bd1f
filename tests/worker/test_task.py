"""The Celery task, invoked for real (`apply` runs it in this process, as a worker's child would).

A run trains a width-8 ResNet18 on 300 real CIFAR-10 images: a few seconds on CPU.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.db import session_scope, utcnow
from app.submissions import runs as run_service
from app.submissions.models import EpochMetric, Run, RunLogits, RunStatus, TestLabels
from tests.factories import join, make_competition, make_organizer
from worker.engine.split import public_private_indices

pytestmark = pytest.mark.slow


@pytest.fixture
def contest(client, admin_headers, tiny_cifar):
    def make(seeds=(0,), max_epochs=2, **kw):
        org = make_organizer(client, admin_headers)
        kw.setdefault("dataset", {"name": "cifar10", "path": str(tiny_cifar)})
        comp = make_competition(client, org, seeds=list(seeds), budget={"max_epochs": max_epochs}, **kw)
        return comp, join(client, comp["slug"])
    return make


def _submit(client, comp, student, **config):
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": config}, headers=student)
    assert r.status_code == 201, r.text
    return r.json()


def _run_ids(db, submission_id):
    return db.scalars(select(Run.id).where(Run.submission_id == submission_id).order_by(Run.id)).all()


def _orphan(run_id, *, attempts, host):
    """Leave the run as a vanished worker would: running, its heartbeat an hour old."""
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == run_id).values(
            status="running", attempts=attempts, worker_hostname=host, heartbeat_at=utcnow() - timedelta(hours=1)))


def _wake():
    """Deliver one wake-up token (app.dispatch) to this process, as a worker's child would take it."""
    from worker.tasks import train_run

    return train_run.apply().get()


IDLE = "skipped: no queued run on train.cpu"


def test_task_trains_and_reports_to_the_leaderboard(client, db, contest):
    comp, student = contest(seeds=(0, 1))
    sub = _submit(client, comp, student, lr=0.05, batch_size=32, epochs=2)
    ids = _run_ids(db, sub["id"])
    assert [_wake(), _wake()] == ["succeeded", "succeeded"]

    detail = client.get(f"/api/submissions/{sub['id']}", headers=student).json()
    assert detail["status"] == "succeeded"
    for run in detail["runs"]:
        assert run["status"] == "succeeded" and run["attempts"] == 1 and run["progress"] == 1.0
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["gpu_seconds"] > 0 and run["wall_seconds"] >= run["gpu_seconds"] * 0.5
        assert run["device_name"].startswith("CPU") and run["worker_hostname"]
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert all(e["train_loss"] > 0 and e["images_per_sec"] > 0 for e in run["epochs"])
        assert run["result"]["versions"]["torch"].startswith("2.14")
        assert run["result"]["stop_reason"] == "completed"
        # The row's setup report and training time agree with the result they were written from.
        timings = run["result"]["timings"]
        assert (run["precision"], run["setup_seconds"], run["train_seconds"]) == (
            run["result"]["precision"], timings["setup_seconds"], timings["train_seconds"])
        assert run["result"]["spec"]["seed"] == run["seed"]
        assert run["result"]["spec"]["deterministic"] is False
        # Nothing computed on the private test half reaches participants.
        assert "private_accuracy" not in run["result"] and "private" not in run["result"]["metrics"]
        assert "accuracy_all" not in run["result"]["metrics"] and "public" in run["result"]["metrics"]
    mean_acc = sum(r["accuracy"] for r in detail["runs"]) / 2
    assert detail["accuracy"] == pytest.approx(mean_acc)

    logits = db.get(RunLogits, ids[0])
    assert (logits.rows, logits.cols, logits.dtype) == (100, 10, "float16")
    assert len(logits.data) == 100 * 10 * 2

    board = client.get(f"/api/competitions/{comp['slug']}/leaderboard").json()["entries"]
    assert board[0]["submission_id"] == sub["id"] and board[0]["accuracy"] == pytest.approx(mean_acc)


def test_a_spare_token_trains_nothing_twice(client, db, contest):
    comp, student = contest()
    sub = _submit(client, comp, student, batch_size=32, epochs=1)
    (run_id,) = _run_ids(db, sub["id"])
    assert _wake() == "succeeded"
    assert _wake() == IDLE
    db.expire_all()
    assert db.get(Run, run_id).attempts == 1
    assert db.scalar(select(EpochMetric.epoch).where(EpochMetric.run_id == run_id)) == 1


def test_a_success_stores_per_image_correctness_and_the_test_labels_once(client, db, contest, caplog):
    import logging

    import numpy as np

    comp, student = contest()
    first = _submit(client, comp, student, batch_size=32, epochs=1)
    (run_id,) = _run_ids(db, first["id"])
    assert _wake() == "succeeded"
    db.expire_all()
    run, logits = db.get(Run, run_id), db.get(RunLogits, run_id)
    labels_row = db.get(TestLabels, comp["id"])
    labels = np.frombuffer(labels_row.data, dtype=np.uint8)
    assert labels_row.rows == 100 and np.bincount(labels).tolist() == [10] * 10  # the tiny test set's
    scores = np.frombuffer(logits.data, dtype=np.float16).reshape(100, 10)
    correct = np.unpackbits(np.frombuffer(logits.correct, dtype=np.uint8))[:100].astype(bool)
    assert (correct == (scores.argmax(1) == labels)).all()
    # The public half's accuracy, recomputed from the stored bits (fp16 logits may break a near-tie the
    # fp32 ones the engine scored did not).
    public = list(public_private_indices(100)[0])
    assert abs(correct[public].mean() - run.accuracy) <= 2 / len(public)
    assert run.ece == run.result["metrics"]["public"]["ece"]
    assert run.private_ece == run.result["metrics"]["private"]["ece"]

    copy = _submit(client, comp, student, batch_size=32, epochs=1)  # identical: reuses the result
    (copy_id,) = _run_ids(db, copy["id"])
    db.expire_all()
    reused = db.get(Run, copy_id)
    assert reused.reused_from_run_id == run_id and (reused.ece, reused.private_ece) == (run.ece, run.private_ece)
    assert db.get(RunLogits, copy_id).correct == logits.correct

    # A later success whose labels differ from the stored ones (the data changed under the competition)
    # leaves them as they are, and says so.
    tampered = bytes((labels + 1) % 10)
    db.execute(update(TestLabels).where(TestLabels.competition_id == comp["id"]).values(data=tampered))
    db.commit()
    _submit(client, comp, student, batch_size=64, epochs=1)
    with caplog.at_level(logging.ERROR, logger="hparena.submissions"):
        assert _wake() == "succeeded"
    db.expire_all()
    assert db.get(TestLabels, comp["id"]).data == tampered
    assert "differ from the stored ones" in caplog.text


def test_same_seed_same_config_same_result(client, db, contest):
    comp, student = contest(deterministic=True)
    a = _submit(client, comp, student, batch_size=32, epochs=1)
    b = _submit(client, comp, student, batch_size=32, epochs=1)
    assert [_wake(), _wake()] == ["succeeded", "succeeded"]
    accs = [client.get(f"/api/submissions/{s['id']}", headers=student).json()["runs"][0] for s in (a, b)]
    assert accs[0]["result"]["spec"]["deterministic"] is True
    assert accs[0]["accuracy"] == accs[1]["accuracy"]
    assert accs[0]["epochs"][0]["train_loss"] == pytest.approx(accs[1]["epochs"][0]["train_loss"], rel=1e-5)


def test_stale_running_run_is_reclaimed_and_old_worker_is_fenced_off(client, db, contest):
    comp, student = contest()
    sub = _submit(client, comp, student, batch_size=32, epochs=1)
    (run_id,) = _run_ids(db, sub["id"])
    with session_scope() as s:
        dead = run_service.claim(s, run_id, "dead-worker", stale_after=60, max_attempts=3)
    assert dead.attempt == 1
    # While its heartbeat is fresh, a token leaves the run alone.
    assert _wake() == IDLE
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    with session_scope() as s:
        assert run_service.requeue_stale(s, stale_after=60, max_attempts=3) == [(run_id, "train.cpu")]
    assert _wake() == "succeeded"
    db.expire_all()
    run = db.get(Run, run_id)
    assert run.attempts == 2 and run.worker_hostname != "dead-worker"
    with session_scope() as s:  # the presumed-dead worker wakes up and tries to report: refused
        assert run_service.finish(s, dead, RunStatus.failed, error="late") == run_service.SUPERSEDED
    db.expire_all()
    assert db.get(Run, run_id).status == "succeeded"


def test_run_left_running_by_a_dead_child_of_this_worker_is_retaken_at_once(client, db, contest):
    import socket

    comp, student = contest()
    sub = _submit(client, comp, student, batch_size=32, epochs=1)
    (run_id,) = _run_ids(db, sub["id"])
    me = socket.gethostname()  # the hostname Celery gives a task applied in-process
    with session_scope() as s:
        first = run_service.claim(s, run_id, me, stale_after=60, max_attempts=3)
    assert first.attempt == 1
    # Fresh heartbeat, but this worker runs one task at a time: the earlier child must be gone.
    assert _wake() == "succeeded"
    db.expire_all()
    assert db.get(Run, run_id).attempts == 2


def test_sweep_requeues_a_run_whose_worker_vanished_then_it_trains(client, db, contest, settings_env):
    comp, student = contest()
    sub = _submit(client, comp, student, batch_size=32, epochs=1)
    (run_id,) = _run_ids(db, sub["id"])
    with session_scope() as s:
        gone = run_service.claim(s, run_id, "gone-node", stale_after=60, max_attempts=3)
    with session_scope() as s:  # fresh heartbeat: nothing to sweep
        assert run_service.requeue_stale(s, stale_after=60, max_attempts=3) == []
        s.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    with session_scope() as s:
        assert run_service.requeue_stale(s, stale_after=60, max_attempts=3) == [(run_id, "train.cpu")]
    with session_scope() as s:  # a second sweeper finds nothing left to do
        assert run_service.requeue_stale(s, stale_after=60, max_attempts=3) == []
    detail = client.get(f"/api/submissions/{sub['id']}", headers=student).json()
    assert detail["status"] == "queued" and "gone-node stopped heartbeating" in detail["runs"][0]["error"]
    assert _wake() == "succeeded"
    db.expire_all()
    run = db.get(Run, run_id)
    assert run.attempts == 2 and run.error is None
    with session_scope() as s:
        assert run_service.finish(s, gone, RunStatus.failed, error="late") == run_service.SUPERSEDED


def test_sweep_gives_up_after_max_attempts(client, db, contest):
    comp, student = contest()
    sub = _submit(client, comp, student, batch_size=32, epochs=1)
    (run_id,) = _run_ids(db, sub["id"])
    _orphan(run_id, attempts=3, host="w3")
    with session_scope() as s:
        assert run_service.requeue_stale(s, stale_after=60, max_attempts=3) == []
    detail = client.get(f"/api/submissions/{sub['id']}", headers=student).json()
    assert detail["status"] == "failed" and "worker lost 3 times (last on w3)" in detail["error"]


def test_a_child_lost_too_often_fails_its_run_and_the_token_trains_the_next(client, db, contest):
    import socket

    comp, student = contest()
    lost, nxt = (_submit(client, comp, student, batch_size=32, epochs=1) for _ in range(2))
    (run_id,) = _run_ids(db, lost["id"])
    _orphan(run_id, attempts=3, host=socket.gethostname())  # this worker's child died on its third attempt
    assert _wake() == "succeeded"
    detail = client.get(f"/api/submissions/{lost['id']}", headers=student).json()
    assert detail["status"] == "failed"
    assert f"worker lost 3 times (last on {socket.gethostname()})" in detail["runs"][0]["error"]
    assert client.get(f"/api/submissions/{nxt['id']}", headers=student).json()["status"] == "succeeded"


def test_crash_leaves_failed_with_error_text(client, db, contest, tmp_path):
    comp, student = contest(dataset={"name": "cifar10", "path": str(tmp_path / "gone.tar.gz")})
    sub = _submit(client, comp, student, batch_size=32, epochs=1)
    # The dataset missing on this machine is no fault of the run's: retried up to the limit, then failed.
    assert [_wake(), _wake(), _wake()] == ["requeued", "requeued", "failed"]
    detail = client.get(f"/api/submissions/{sub['id']}", headers=student).json()
    assert detail["status"] == "failed" and detail["failure_kind"] == "infrastructure"
    assert "gone.tar.gz" in detail["runs"][0]["error"] and "does not exist" in detail["runs"][0]["error"]
    assert detail["error"] == detail["runs"][0]["error"]


def test_nan_loss_leaves_diverged_with_epoch(client, db, contest, monkeypatch):
    import torch

    import worker.engine.train as engine_train

    real_build = engine_train.build_model
    calls = {"n": 0}

    def poisoned_build(*args, **kwargs):
        """Fault injection: from the 12th forward pass on, the model's output is NaN."""
        model = real_build(*args, **kwargs)

        def hook(_module, _inputs, output):
            if _module.training:
                calls["n"] += 1
            return output * float("nan") if calls["n"] >= 12 else output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(engine_train, "build_model", poisoned_build)
    comp, student = contest(max_epochs=3)
    sub = _submit(client, comp, student, batch_size=32, epochs=3)  # 9 steps per epoch: NaN in epoch 2
    assert _wake() == "diverged"
    run = client.get(f"/api/submissions/{sub['id']}", headers=student).json()["runs"][0]
    assert run["status"] == "diverged" and run["stop_reason"] == "diverged"
    assert (run["diverged_epoch"], run["diverged_step"]) == (2, 12)
    assert "NaN" in run["error"] and "step 12" in run["error"]
    assert [e["epoch"] for e in run["epochs"]] == [1]  # epoch 3 was never started: no budget burned
    assert torch.isfinite(torch.tensor(run["epochs"][0]["train_loss"]))


@pytest.fixture
def training(client, db, contest, settings_env, monkeypatch):
    """A 50-epoch run training in a background thread, returned once its first epoch row is written:
    (submission, student headers, run id, the task's return value once it ends, the thread)."""
    monkeypatch.setenv("HPARENA_HEARTBEAT_SECONDS", "0.2")
    from app.config import get_settings

    get_settings.cache_clear()
    comp, student = contest(max_epochs=50, search_space={})
    sub = _submit(client, comp, student, batch_size=32, epochs=50)
    (run_id,) = _run_ids(db, sub["id"])
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(_wake()))
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        with session_scope() as s:
            if s.scalar(select(EpochMetric.id).where(EpochMetric.run_id == run_id)):
                break
        time.sleep(0.2)
    yield sub, student, run_id, out, t
    t.join(60)


def test_cancel_while_running_stops_the_worker(client, training):
    sub, student, run_id, out, t = training
    r = client.post(f"/api/submissions/{sub['id']}/cancel", headers=student)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    t.join(60)
    assert out == ["cancelled"]
    with session_scope() as s:
        epochs = s.scalars(select(EpochMetric.epoch).where(EpochMetric.run_id == run_id)).all()
        assert s.get(Run, run_id).status == "cancelled"
    assert len(epochs) < 50


def test_a_running_run_shows_its_precision_and_setup_before_its_result(client, training):
    sub, student, run_id, out, t = training
    run = client.get(f"/api/submissions/{sub['id']}", headers=student).json()["runs"][0]
    assert run["status"] == "running" and run["result"] is None
    assert run["precision"] in ("bf16", "fp32") and run["setup_seconds"] > 0
    assert run["train_seconds"] == run["epochs"][-1]["seconds"] > 0
    token = student["Authorization"].removeprefix("Bearer ")
    page = client.get(f"/submissions/{sub['id']}", headers={"Accept": "text/html",
                                                             "Cookie": f"hparena_token={token}"}).text
    assert f'id="precision">{run["precision"]}<' in page
    assert client.post(f"/api/submissions/{sub['id']}/cancel", headers=student).status_code == 200
    t.join(60)
    assert out == ["cancelled"]


def test_a_superseded_worker_stops_and_says_superseded_not_cancelled(training):
    _, _, run_id, out, t = training
    with session_scope() as s:  # another worker took the run over (what a stale-heartbeat reclaim does)
        s.execute(update(Run).where(Run.id == run_id).values(attempts=Run.attempts + 1, worker_hostname="other"))
    t.join(60)
    assert out == ["superseded"]
    with session_scope() as s:
        run = s.get(Run, run_id)
        assert (run.status, run.worker_hostname, run.result) == ("running", "other", None)  # nothing written


def test_the_worker_trains_the_spec_stored_at_submission(client, db, contest):
    from app.competitions.models import Competition
    from worker.engine.config import Budget, RunSpec

    comp, student = contest(seeds=(3, 4), max_epochs=2)
    sub = _submit(client, comp, student, lr=0.05, batch_size=32)  # epochs unset: the whole budget
    ids = _run_ids(db, sub["id"])
    runs = [db.get(Run, i) for i in ids]
    assert [r.spec.seed for r in runs] == [3, 4]
    for r in runs:
        assert isinstance(r.spec, RunSpec) and r.spec_hash == r.spec.identity()
        assert r.spec.config.epochs == 2 and r.spec.config.lr == 0.05
        assert r.spec.data.path == comp["dataset"]["path"] and r.spec.model.width == comp["model"]["width"]
    assert runs[0].spec_hash != runs[1].spec_hash  # the seed is part of the identity
    stored = runs[0].spec
    with session_scope() as s:  # the organizer's later edit does not reach an already submitted run
        s.execute(update(Competition).where(Competition.id == comp["id"]).values(budget=Budget(max_epochs=1)))
    assert _wake() == "succeeded"
    run = client.get(f"/api/submissions/{sub['id']}", headers=student).json()["runs"][0]
    assert RunSpec.model_validate(run["result"]["spec"]) == stored
    assert run["result"]["epochs_completed"] == 2


def test_a_retried_attempt_resumes_from_the_checkpoint_of_the_lost_one(client, db, contest):
    """The first attempt's process died after epoch 1 (its checkpoint on disk, the run still running with
    a stale heartbeat); once the sweep requeues it, the next attempt resumes there and ends as a run never stopped."""
    from app.config import get_settings
    from worker.engine.data import load_dataset
    from worker.engine.result import EpochEvent
    from worker.engine.train import train

    comp, student = contest(max_epochs=2, deterministic=True)
    lost, fresh = (_submit(client, comp, student, batch_size=32, lr=0.05) for _ in range(2))
    (lost_id,), (fresh_id,) = _run_ids(db, lost["id"]), _run_ids(db, fresh["id"])
    settings = get_settings()
    ckpt = settings.checkpoint_dir / f"run-{lost_id}"
    spec = db.get(Run, lost_id).spec
    data = load_dataset(spec.data, settings.data_dir, download=False, default_path=settings.dataset_path)

    def die_after_epoch_1(e):
        if isinstance(e, EpochEvent) and e.epoch == 1:
            raise SystemExit  # stands in for the process dying: nothing after the checkpoint runs

    with pytest.raises(SystemExit):
        train(spec, data, "cpu", die_after_epoch_1, checkpoint_dir=ckpt)
    _orphan(lost_id, attempts=1, host="lost-node")
    with session_scope() as s:
        assert run_service.requeue_stale(s, stale_after=60, max_attempts=3) == [(lost_id, "train.cpu")]

    assert [_wake(), _wake()] == ["succeeded", "succeeded"]
    runs = {r["id"]: r for s in (lost, fresh)
            for r in client.get(f"/api/submissions/{s['id']}", headers=student).json()["runs"]}
    resumed, whole = runs[lost_id], runs[fresh_id]
    assert resumed["attempts"] == 2 and resumed["result"]["resumed"]["epochs"] == 1
    assert whole["result"]["resumed"] is None
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]  # the checkpoint's epoch is shown again
    assert resumed["accuracy"] == whole["accuracy"]
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in whole["epochs"]]
    assert resumed["gpu_seconds"] > resumed["result"]["resumed"]["earlier_attempt_seconds"][0]
    assert not ckpt.exists()  # the run is over: its checkpoint is gone


def test_checkpoints_of_finished_or_unknown_runs_are_found_for_removal(client, db, contest, tmp_path):
    comp, student = contest()
    done, queued = (_submit(client, comp, student, batch_size=32, epochs=1) for _ in range(2))
    (done_id,), (queued_id,) = _run_ids(db, done["id"]), _run_ids(db, queued["id"])
    with session_scope() as s:  # ended without a worker: cancelled while it waited for a retry
        s.execute(update(Run).where(Run.id == done_id).values(status="cancelled"))
    dirs = [run_service.checkpoint_dir(tmp_path, i) for i in (done_id, queued_id, 10**6)]
    for d in dirs:
        d.mkdir()
    (tmp_path / "run-notes").mkdir()  # not a run's directory: never touched
    with session_scope() as s:
        assert run_service.finished_checkpoints(s, tmp_path) == [dirs[0], dirs[2]]
        assert run_service.finished_checkpoints(s, tmp_path / "missing") == []
