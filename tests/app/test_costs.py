"""Cost and ETA before queueing (app.costs): predictions from a class's prior and from the throughput table
that finished runs fill, the per-team GPU-hour budget (429 with what is left; charged on completion), and a
queued submission's position and ETA from the class's live workers. Through the HTTP API and the real Celery
task, applied in this process (as tests/worker/test_task.py does)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from app.admin.models import HardwareClass, Throughput, WorkerNode
from app.admin.service import upsert_node
from app.db import session_scope, utcnow
from app.submissions import runs as run_service
from app.submissions.models import Run
from tests.factories import cpu_class, join, make_competition, make_organizer, submit
from worker.engine.result import TrainResult

PRIOR_TRAIN, PRIOR_EVAL = 400.0, 1500.0  # tests.factories.cpu_class's prior (width 64, 32 px)


def _cost(width: int) -> float:
    """Time per image relative to width 64 on 32 px, as app.costs documents it: 10% fixed, 90% with compute."""
    return 0.1 + 0.9 * (width / 64) ** 2


@pytest.fixture
def hw(database_url) -> str:
    """A CPU class of this test's own, with the factory's prior: a queue nobody else fills or serves."""
    name = f"costs-{uuid.uuid4().hex[:8]}"
    cpu_class(database_url, name, train_images_per_sec=PRIOR_TRAIN, eval_images_per_sec=PRIOR_EVAL)
    return name


@pytest.fixture
def contest(client, admin_headers, tiny_cifar):
    def make(**kw):
        org = make_organizer(client, admin_headers, name=f"org-{uuid.uuid4().hex[:6]}")
        kw.setdefault("dataset", {"name": "cifar10", "path": str(tiny_cifar)})
        kw.setdefault("budget", {"max_epochs": 2})
        return make_competition(client, org, **kw)
    return make


def _get(client, sub, student):
    r = client.get(f"/api/submissions/{sub['id']}", headers=student)
    assert r.status_code == 200, r.text
    return r.json()


def _budget(client, comp, student):
    r = client.get(f"/api/competitions/{comp['slug']}/budget", headers=student)
    assert r.status_code == 200, r.text
    return r.json()


def _wake():
    from worker.tasks import train_run

    return train_run.apply().get()


def _by_hand(train_ips, eval_ips, *, epochs, batch, n_train, n_test, tta_views=6):
    """What app.costs documents: whole batches per epoch over train images/s; the public half after every
    epoch plus every TTA view of the test set, over eval images/s."""
    train = epochs * (n_train // batch) * batch / train_ips
    return train + (n_test // 2 * epochs + n_test * tta_views) / eval_ips


# ---- prediction -------------------------------------------------------------------------------------------


def test_prediction_from_the_class_prior_scaled_for_width(client, contest, hw):
    comp = contest(hardware_class=hw, model={"arch": "resnet18", "width": 16},
                   dataset={"name": "cifar10", "train_subset": 1000, "test_subset": 200})
    student = join(client, comp["slug"])
    sub = submit(client, comp, student, batch_size=64, epochs=2, tta="flip")
    scale = _cost(16)  # 1/16 of the prior's compute per image, and the fixed part
    want = _by_hand(PRIOR_TRAIN / scale, PRIOR_EVAL / scale, epochs=2, batch=64, n_train=1000, n_test=200,
                    tta_views=2)
    assert sub["predicted_seconds"] == pytest.approx(want)
    assert sub["predicted_gpu_hours"] == pytest.approx(want / 3600)
    assert sub["cost_unit"] == "cpu-seconds"
    assert sub["prediction_error"] is None  # not trained yet
    detail = _get(client, sub, student)
    assert detail["runs"][0]["predicted_seconds"] == pytest.approx(want)


def test_unknown_dataset_size_is_priced_as_cifar10(client, contest, hw):
    comp = contest(hardware_class=hw)  # the tiny tarball, no subsets: its size is unknown until a run loads it
    student = join(client, comp["slug"])
    sub = submit(client, comp, student, batch_size=100, epochs=1, tta="none")
    scale = _cost(8)
    assert sub["predicted_seconds"] == pytest.approx(
        _by_hand(PRIOR_TRAIN / scale, PRIOR_EVAL / scale, epochs=1, batch=100, n_train=50_000, n_test=10_000,
                 tta_views=1))


def test_time_budget_caps_the_training_part(client, contest, hw):
    comp = contest(hardware_class=hw, model={"arch": "resnet18", "width": 64},
                   dataset={"name": "cifar10", "train_subset": 2000, "test_subset": 100},
                   budget={"max_epochs": 4, "max_seconds": 3.0})
    student = join(client, comp["slug"])
    sub = submit(client, comp, student, batch_size=100, epochs=4, tta="none")
    # Uncapped training would take 4 x 2000 / 400 = 20 s; the budget stops it after 3 s, within its first
    # epoch, so one per-epoch evaluation runs.
    assert sub["predicted_seconds"] == pytest.approx(3.0 + (50 * 1 + 100) / PRIOR_EVAL)


@pytest.mark.slow
def test_a_finished_run_teaches_the_table_and_prices_the_next_submission(client, db, contest):
    comp = contest()  # class "cpu": what a task applied in this process serves
    student = join(client, comp["slug"])
    prior = db.get(HardwareClass, "cpu")
    first = submit(client, comp, student, lr=0.05, batch_size=32, epochs=2)
    scale = _cost(8)
    assert first["predicted_seconds"] == pytest.approx(_by_hand(
        prior.train_images_per_sec / scale, prior.eval_images_per_sec / scale, epochs=2, batch=32,
        n_train=50_000, n_test=10_000))
    assert _wake() == "succeeded"

    run = db.scalars(select(Run).where(Run.submission_id == first["id"])).one()
    result = TrainResult.model_validate(run.result)
    (row,) = db.scalars(select(Throughput)).all()
    assert (row.hardware_class, row.model_key, row.image_size, row.runs) == ("cpu", "resnet18/w8/cifar/auto+cl/b32",
                                                                            32, 1)
    # Every device-second that was not evaluation counts as training, so the row reproduces the run's cost.
    train_seconds = result.device_seconds - result.timings.eval_seconds
    assert row.train_images_per_sec == pytest.approx(result.steps_completed * 32 / train_seconds)
    assert row.eval_images_per_sec == pytest.approx((50 * 2 + 100 * 6) / result.timings.eval_seconds)

    shown = _get(client, first, student)
    assert shown["prediction_error"] == pytest.approx(
        (shown["gpu_seconds"] - shown["predicted_seconds"]) / shown["predicted_seconds"])
    assert shown["runs"][0]["prediction_error"] is not None

    # The same shape again (another lr, so it is no dedup hit): the table and the dataset size the first run
    # loaded (300 / 100) predict exactly what the first run measured.
    second = submit(client, comp, student, lr=0.06, batch_size=32, epochs=2)
    assert second["predicted_seconds"] == pytest.approx(result.device_seconds)
    assert second["predicted_seconds"] == pytest.approx(_by_hand(
        row.train_images_per_sec, row.eval_images_per_sec, epochs=2, batch=32, n_train=300, n_test=100))
    assert _wake() == "succeeded"
    db.expire_all()
    assert db.scalars(select(Throughput)).one().runs == 2
    done = _get(client, second, student)
    assert done["status"] == "succeeded" and done["prediction_error"] is not None
    assert "eta_seconds" in done and done["eta_seconds"] is None and done["queue_position"] is None


@pytest.mark.slow
def test_a_measured_width_scales_to_another_width(client, db, contest):
    comp8 = contest(model={"arch": "resnet18", "width": 8})
    student8 = join(client, comp8["slug"])
    submit(client, comp8, student8, batch_size=32, epochs=1)
    assert _wake() == "succeeded"
    row = db.scalars(select(Throughput)).one()
    comp16 = contest(model={"arch": "resnet18", "width": 16},
                     dataset={"name": "cifar10", "train_subset": 200, "test_subset": 100})
    sub = submit(client, comp16, join(client, comp16["slug"]), batch_size=32, epochs=1)
    # Not measured at width 16: the width-8 row, scaled by the relative cost (4x the compute per image).
    slower = _cost(16) / _cost(8)
    assert sub["predicted_seconds"] == pytest.approx(_by_hand(
        row.train_images_per_sec / slower, row.eval_images_per_sec / slower, epochs=1, batch=32, n_train=200,
        n_test=100))


def test_two_measured_widths_give_the_line_between_them(client, db, contest, hw):
    # Seconds per image measured at widths 8 and 16 (relative compute 1/64 and 1/16): 2 ms and 3 ms training,
    # 0.5 ms and 0.8 ms evaluating. Width 12 (compute 9/256) lies on the lines through them.
    for width, train, evaluate in ((8, 0.002, 0.0005), (16, 0.003, 0.0008)):
        db.add(Throughput(hardware_class=hw, model_key=f"resnet18/w{width}/cifar/auto+cl/b100", image_size=32,
                          train_images_per_sec=1 / train, eval_images_per_sec=1 / evaluate, runs=3,
                          updated_at=utcnow()))
    db.commit()
    comp = contest(hardware_class=hw, model={"arch": "resnet18", "width": 12},
                   dataset={"name": "cifar10", "train_subset": 1000, "test_subset": 200})
    sub = submit(client, comp, join(client, comp["slug"]), batch_size=100, epochs=2)
    at = (9 / 256 - 1 / 64) / (1 / 16 - 1 / 64)  # how far width 12 is from 8 towards 16, in compute
    train, evaluate = 0.002 + at * 0.001, 0.0005 + at * 0.0003
    assert sub["predicted_seconds"] == pytest.approx(_by_hand(1 / train, 1 / evaluate, epochs=2, batch=100,
                                                              n_train=1000, n_test=200))


def test_a_batch_size_not_measured_lies_between_two_that_were(client, db, contest, hw):
    # Width 8 measured at batch 32 (4 ms per image) and 128 (2.5 ms): 2 ms per image plus 64 ms per step fit
    # both. Batch 64 costs 2 + 64 / 64 = 3 ms per image; evaluation, the mean over the two rows' runs.
    for batch, train, evaluate, runs in ((32, 0.004, 0.001, 1), (128, 0.0025, 0.0007, 3)):
        db.add(Throughput(hardware_class=hw, model_key=f"resnet18/w8/cifar/auto+cl/b{batch}", image_size=32,
                          train_images_per_sec=1 / train, eval_images_per_sec=1 / evaluate, runs=runs,
                          updated_at=utcnow()))
    db.commit()
    comp = contest(hardware_class=hw, dataset={"name": "cifar10", "train_subset": 1000, "test_subset": 200})
    student = join(client, comp["slug"])
    sub = submit(client, comp, student, batch_size=64, epochs=2)
    assert sub["predicted_seconds"] == pytest.approx(_by_hand(1 / 0.003, 1 / ((0.001 + 3 * 0.0007) / 4), epochs=2,
                                                              batch=64, n_train=1000, n_test=200))
    # A batch size beyond both: the same line (the per-step part shrinks towards the per-image part).
    sub = submit(client, comp, student, batch_size=100, epochs=2)  # 2 + 64 / 100 = 2.64 ms
    assert sub["predicted_seconds"] == pytest.approx(_by_hand(1 / 0.00264, 1 / ((0.001 + 3 * 0.0007) / 4),
                                                              epochs=2, batch=100, n_train=1000, n_test=200))


# ---- budget -----------------------------------------------------------------------------------------------


def test_entry_over_the_remaining_budget_is_refused_with_what_is_left(client, db, contest, hw):
    # The prior prices this entry at 2 x 1000 / 400 + (2 x 100 + 200 x 6) / 1500 = 5.93 s at width 64.
    comp = contest(hardware_class=hw, model={"arch": "resnet18", "width": 64}, gpu_hour_budget=10 / 3600,
                   dataset={"name": "cifar10", "train_subset": 1000, "test_subset": 200})
    student = join(client, comp["slug"])
    view = _budget(client, comp, student)
    assert view["budget_gpu_hours"] == pytest.approx(10 / 3600) and view["remaining_seconds"] == pytest.approx(10)
    assert (view["spent_seconds"], view["reserved_seconds"], view["runs_charged"]) == (0, 0, 0)
    assert view["cost_unit"] == "cpu-seconds"

    first = submit(client, comp, student, batch_size=100, epochs=2)
    predicted = first["predicted_seconds"]
    assert predicted == pytest.approx(_by_hand(PRIOR_TRAIN, PRIOR_EVAL, epochs=2, batch=100, n_train=1000,
                                               n_test=200))
    view = _budget(client, comp, student)
    assert view["reserved_seconds"] == pytest.approx(predicted) and view["runs_unfinished"] == 1
    assert view["remaining_seconds"] == pytest.approx(10 - predicted)

    # A second identical-cost entry does not fit in what the first one left.
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": {"batch_size": 100,
                    "epochs": 2, "lr": 0.3}}, headers=student)
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["remaining_seconds"] == pytest.approx(10 - predicted)
    assert body["remaining_gpu_hours"] == pytest.approx((10 - predicted) / 3600)
    assert body["predicted_seconds"] == pytest.approx(predicted)
    assert body["reserved_seconds"] == pytest.approx(predicted)
    assert body["budget_gpu_hours"] == pytest.approx(10 / 3600) and body["cost_unit"] == "cpu-seconds"
    assert "left" in body["detail"] and "Retry-After" not in r.headers
    # Nothing was stored: no submission, nothing reserved, the team's count unchanged.
    listed = client.get("/api/submissions", headers=student).json()
    assert [s["id"] for s in listed] == [first["id"]]
    assert _budget(client, comp, student)["runs_unfinished"] == 1

    # A cheaper entry that fits is taken.
    submit(client, comp, student, batch_size=100, epochs=1)


def test_a_cancelled_queued_entry_frees_its_reservation(client, contest, hw):
    comp = contest(hardware_class=hw, model={"arch": "resnet18", "width": 64}, gpu_hour_budget=10 / 3600,
                   dataset={"name": "cifar10", "train_subset": 1000, "test_subset": 200})
    student = join(client, comp["slug"])
    first = submit(client, comp, student, batch_size=100, epochs=2)
    submit(client, comp, student, expect=429, batch_size=100, epochs=2, lr=0.3)
    assert client.post(f"/api/submissions/{first['id']}/cancel", headers=student).status_code == 200
    assert _budget(client, comp, student)["reserved_seconds"] == 0
    submit(client, comp, student, batch_size=100, epochs=2, lr=0.3)


def test_budget_view_without_a_budget(client, contest, hw):
    comp = contest(hardware_class=hw)
    student = join(client, comp["slug"])
    view = _budget(client, comp, student)
    assert view["budget_gpu_hours"] is None and view["remaining_seconds"] is None
    assert view["remaining_gpu_hours"] is None and view["budget_seconds"] is None
    assert client.get(f"/api/competitions/{comp['slug']}/budget").status_code == 401
    assert client.get("/api/competitions/no-such/budget", headers=student).status_code == 404


@pytest.mark.slow
def test_the_actual_cost_is_charged_on_completion(client, db, contest):
    comp = contest(gpu_hour_budget=1.0)
    student = join(client, comp["slug"])
    other = join(client, comp["slug"], name="bob")
    sub = submit(client, comp, student, batch_size=32, epochs=1)
    before = _budget(client, comp, student)
    assert before["reserved_seconds"] == pytest.approx(sub["predicted_seconds"]) and before["spent_seconds"] == 0
    assert _wake() == "succeeded"
    run = db.scalars(select(Run).where(Run.submission_id == sub["id"])).one()
    assert run.charged_seconds == pytest.approx(run.gpu_seconds) and run.charged_seconds > 0
    after = _budget(client, comp, student)
    assert after["spent_seconds"] == pytest.approx(run.charged_seconds) and after["reserved_seconds"] == 0
    assert after["remaining_seconds"] == pytest.approx(3600 - run.charged_seconds)
    assert (after["runs_charged"], after["runs_unfinished"]) == (1, 0)
    assert _get(client, sub, student)["charged_seconds"] == pytest.approx(run.charged_seconds)
    # Another team's budget is its own.
    assert _budget(client, comp, other)["spent_seconds"] == 0


# ---- queue position and ETA -------------------------------------------------------------------------------


def _worker(hostname, queue, **fields):
    with session_scope() as s:
        upsert_node(s, hostname, queue, **fields)


def test_queue_position_and_eta_from_live_workers(client, db, contest, hw):
    comp = contest(hardware_class=hw, dataset={"name": "cifar10", "train_subset": 1000, "test_subset": 200})
    queue = f"train.{hw}"
    alice, bob = join(client, comp["slug"], name="alice"), join(client, comp["slug"], name="bob")
    a = [submit(client, comp, alice, batch_size=100, epochs=e) for e in (1, 2, 1)]
    b = submit(client, comp, bob, batch_size=100, epochs=2)
    pa, pb = [s["predicted_seconds"] for s in a], b["predicted_seconds"]
    assert pa[0] != pa[1]

    # Nobody serves the class: a position, but no ETA, and the note says why.
    assert b["queue_position"] == 3 and b["eta_seconds"] is None and b["eta_at"] is None
    assert "no live worker" in b["eta_note"]
    assert a[0]["queue_position"] == 0

    _worker("w1@node", queue)
    shown = _get(client, b, bob)
    assert shown["queue_position"] == 3
    assert shown["eta_seconds"] == pytest.approx(sum(pa) + pb)
    eta_at = datetime.fromisoformat(shown["eta_at"])
    assert abs((eta_at - utcnow()).total_seconds() - shown["eta_seconds"]) < 5
    _worker("w2@node", f"{queue},train.other")
    _worker("sick@node", queue, problem="device is not of its class")  # refuses work: not counted
    _worker("gone@node", queue)
    with session_scope() as s:
        s.execute(update(WorkerNode).where(WorkerNode.hostname == "gone@node")
                  .values(last_seen=utcnow() - timedelta(minutes=10)))
    _worker("elsewhere@node", "train.other")
    shown = _get(client, b, bob)
    assert shown["eta_seconds"] == pytest.approx(sum(pa) / 2 + pb)
    assert "2 live" in shown["eta_note"]

    # Alice's first run starts (the fairest claim): now Bob's team, with nothing running, goes first.
    with session_scope() as s:
        got = run_service.claim_next(s, queue, "w1@node", stale_after=60, max_attempts=3)
    assert got.run_id == db.scalar(select(Run.id).where(Run.submission_id == a[0]["id"]))
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == got.run_id).values(progress=0.25))
    shown = _get(client, b, bob)
    assert shown["queue_position"] == 0
    assert shown["eta_seconds"] == pytest.approx(0.75 * pa[0] / 2 + pb)
    second = _get(client, a[1], alice)
    assert second["queue_position"] == 1
    assert second["eta_seconds"] == pytest.approx((pb + 0.75 * pa[0]) / 2 + pa[1])
    running = _get(client, a[0], alice)
    assert running["status"] == "running" and running["queue_position"] is None
    assert running["eta_seconds"] == pytest.approx(0.75 * pa[0])

    # The list carries the same fields.
    listed = {s["id"]: s for s in client.get("/api/submissions", headers=bob).json()}
    assert listed[b["id"]]["queue_position"] == 0 and listed[b["id"]]["cost_unit"] == "cpu-seconds"


def test_queue_positions_follow_the_order_workers_claim_in(client, db, contest, hw):
    """The position shown is the dispatcher's own order: whatever claim_next takes next was shown as 0, and
    each claim (which changes its team's standing) reorders the rest as the positions then say."""
    comp = contest(hardware_class=hw, dataset={"name": "cifar10", "train_subset": 1000, "test_subset": 200})
    queue = f"train.{hw}"
    teams = [join(client, comp["slug"], name=n) for n in ("ann", "ben", "cat")]
    subs = []
    for who, n in ((0, 4), (1, 2), (2, 1), (0, 1), (1, 1)):
        subs += [(teams[who], submit(client, comp, teams[who], batch_size=64, epochs=1 + len(subs) % 2))
                 for _ in range(n)]
    for k in range(len(subs)):
        shown = {sub["id"]: _get(client, sub, head) for head, sub in subs}
        waiting = sorted((v["queue_position"], sid) for sid, v in shown.items() if v["status"] == "queued")
        assert [pos for pos, _ in waiting] == list(range(len(subs) - k))
        with session_scope() as s:
            got = run_service.claim_next(s, queue, f"w{k}@node", stale_after=60, max_attempts=3)
        assert db.scalar(select(Run.submission_id).where(Run.id == got.run_id)) == waiting[0][1]
