"""The core pages through HTTP, as a browser would fetch them: signing in with a token kept in a cookie, the
board (the same entries as the API gives the same viewer, no private number before the close), a team's
submission with its live curves, and errors that stay 4xx pages."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.db import session_scope, utcnow
from app.submissions import runs as run_service
from app.submissions.models import FailureKind, Run, RunStatus
from tests.factories import join, land, make_competition, make_organizer, submit
from worker.engine.result import (
    CompileInfo,
    DatasetInfo,
    DeviceInfo,
    EpochRow,
    HalfMetrics,
    Metrics,
    Outcome,
    StopReason,
    TestSplit,
    Timings,
    TrainResult,
    Versions,
)

# Private numbers with digits nothing else on a page produces, as the API returns them and as a page prints
# them (percent to 2 decimals; ECE to 3 significant digits).
PRIVATE = {"t1": (0.1234567, 0.0424242), "t2": (0.2345671, 0.0535353)}
SHOWN = {"t1": ("12.35", "0.0424"), "t2": ("23.46", "0.0535")}
LR = {"t1": 0.0123457, "t2": 0.0876543}  # each team's config, which the other must not see


def _token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def _get(client, url: str, who: dict[str, str] | None = None, **kw):
    """GET as a browser signed in as `who` (its API headers; None: signed out), with the cookie /login sets."""
    headers = {"Accept": "text/html"} | ({"Cookie": f"hparena_token={_token(who)}"} if who else {})
    return client.get(url, headers=headers, follow_redirects=False, **kw)


def _entries(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'<tr class="entry[^"]*"\s+data-submission-id="(\d+)"', html)]


def _world(client, admin_headers, seeds=(0,)):
    org = make_organizer(client, admin_headers)
    now = utcnow()
    comp = make_competition(client, org, seeds=list(seeds), deadline=(now + timedelta(hours=2)).isoformat())
    teams = {t: join(client, comp["slug"], name=f"{t}-user", team=t) for t in ("t1", "t2")}
    subs = {}
    for k, (t, h) in enumerate(teams.items()):
        acc, ece = PRIVATE[t]
        subs[t] = land(client, comp, h, {"accuracy": 0.61 + k / 10, "ece": 0.011, "private_accuracy": acc,
                                         "private_ece": ece, "gpu_seconds": 360.0 * (k + 1)}, lr=LR[t])
    return comp, org, teams, subs


# ----------------------------------------------------------------------------------------------------
# Signing in
# ----------------------------------------------------------------------------------------------------


def test_login_keeps_the_token_in_an_httponly_cookie_and_goes_back(client, db, admin_headers):
    form = client.get("/login", params={"next": "/competitions/x"})
    assert form.status_code == 200 and 'id="login-form"' in form.text and 'data-page="login"' in form.text
    assert 'name="next" value="/competitions/x"' in form.text

    r = client.post("/login", data={"token": "test-admin-token", "next": "/competitions/x"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/competitions/x"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("hparena_token=test-admin-token;")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http here; over https it is Secure (test_over_https_the_cookie_is_secure)

    index = client.get("/")  # the client's jar now holds the cookie
    assert 'id="whoami"' in index.text and "bootstrap-admin" in index.text

    out = client.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and 'hparena_token=""' in out.headers["set-cookie"]
    client.cookies.clear()
    assert 'id="login-link"' in client.get("/").text


def test_over_https_the_cookie_is_secure(client, db, admin_headers):
    """Secure follows the scheme the page came over, so a plain-HTTP classroom install can still sign in."""
    org = make_organizer(client, admin_headers)
    r = client.post("https://testserver/login", data={"token": _token(org), "next": "/"}, follow_redirects=False)
    assert r.status_code == 303 and "Secure" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    client.cookies.clear()


def test_another_site_cannot_sign_a_visitor_in_or_out(client, db, admin_headers):
    org = make_organizer(client, admin_headers)
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        r = client.post("/login", data={"token": _token(org), "next": "/"}, headers=headers, follow_redirects=False)
        assert r.status_code == 403 and "set-cookie" not in r.headers, headers
        assert client.post("/logout", headers=headers, follow_redirects=False).status_code == 403
    same = client.post("/login", data={"token": _token(org), "next": "/"}, follow_redirects=False,
                       headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 303
    client.cookies.clear()


def test_pages_load_nothing_from_elsewhere_and_refuse_frames(client, db, admin_headers):
    for path in ("/", "/login", "/competitions/nope"):
        r = client.get(path, headers={"Accept": "text/html"})
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "private, no-store"


@pytest.mark.parametrize("token", ["hpa_not-a-real-token", "", "x" * 5000])
def test_a_wrong_token_shows_the_form_again_with_401(client, db, token):
    r = client.post("/login", data={"token": token, "next": "/"}, follow_redirects=False)
    assert r.status_code == 401
    assert 'id="login-form"' in r.text and 'class="error"' in r.text
    assert "set-cookie" not in r.headers


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "http:/x",
                                    "javascript:alert(1)", "evil.example", "/\t/evil.example"])
def test_login_never_redirects_off_site(client, db, target):
    r = client.post("/login", data={"token": "test-admin-token", "next": target}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    client.cookies.clear()
    form = client.get("/login", params={"next": target})
    assert 'name="next" value="/"' in form.text


# ----------------------------------------------------------------------------------------------------
# Competitions and the board
# ----------------------------------------------------------------------------------------------------


def test_the_board_shows_what_the_api_shows_each_viewer_and_no_private_number_before_the_close(
        client, db, admin_headers, clock):
    comp, org, teams, subs = _world(client, admin_headers)
    slug = comp["slug"]

    index = _get(client, "/")
    assert index.status_code == 200 and f'<tr data-slug="{slug}">' in index.text
    assert f'href="/competitions/{slug}"' in index.text

    viewers = {"anonymous": None, "t1": teams["t1"], "organizer": org}
    for name, who in viewers.items():
        api = client.get(f"/api/competitions/{slug}/leaderboard", headers=who or {}).json()
        page = _get(client, f"/competitions/{slug}", who)
        assert page.status_code == 200, page.text
        assert 'class="projector"' in page.text and 'data-page="board"' in page.text
        assert 'id="board-name" class="pill">public<' in page.text
        assert _entries(page.text) == [e["submission_id"] for e in api["entries"]] == [subs["t2"], subs["t1"]]
        live = _get(client, f"/competitions/{slug}/board.json", who).json()
        assert live["board"]["entries"] == api["entries"], name
        assert _entries(live["rows_html"]) == _entries(page.text)

        def private_in(text: str) -> bool:
            return any(s in text for t in SHOWN for s in SHOWN[t]) or any(
                str(v) in text for t in PRIVATE for v in PRIVATE[t])

        # The public board page is what gets projected: no private number on it, even the organizer's. Its
        # JSON is the API's answer for the same viewer (the organizer's own API board carries them).
        assert not private_in(page.text + live["rows_html"]), name
        assert private_in(str(live["board"])) == (name == "organizer"), name
        if name == "t1":  # its own config is the API's to show; never the other team's
            assert str(LR["t2"]) not in page.text + live["rows_html"] + str(live["board"])

    # The private board before the close: refused as the API refuses it, except to the organizer.
    assert _get(client, f"/competitions/{slug}?board=private", teams["t1"]).status_code == 403
    assert _get(client, f"/competitions/{slug}/board.json?board=private").status_code == 403
    assert _get(client, f"/competitions/{slug}?board=private", org).status_code == 200

    # After the close everyone gets the private board by default, with its numbers.
    clock(timedelta(hours=3))
    api = client.get(f"/api/competitions/{slug}/leaderboard", params={"board": "private"}).json()
    page = _get(client, f"/competitions/{slug}")
    assert 'id="board-name" class="pill">private<' in page.text
    assert _entries(page.text) == [e["submission_id"] for e in api["entries"]]
    assert all(s in page.text for t in SHOWN for s in SHOWN[t])
    assert _get(client, f"/competitions/{slug}/board.json").json()["board"]["entries"] == api["entries"]


def test_board_errors_are_pages_with_4xx(client, db, admin_headers):
    comp, org, teams, subs = _world(client, admin_headers)
    slug = comp["slug"]
    missing = _get(client, "/competitions/no-such-thing")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert 'data-page="error"' in missing.text
    for url in (f"/competitions/{slug}?board=nope", f"/competitions/{slug}?boardd=public",
                "/competitions/%00", "/competitions/" + "x" * 3000, "/login?next=" + "x" * 3000):
        r = _get(client, url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
    assert _get(client, "/competitions/no-such-thing/board.json").status_code == 404
    # A garbage cookie is just nobody: the public pages still show, anonymously.
    for cookie in (b"x" * 4000, b"\x7f", "hpa_é".encode(), b"\xff\xfe", b'"unterminated'):
        r = client.get(f"/competitions/{slug}", headers={"Cookie": b"hparena_token=" + cookie})
        assert r.status_code == 200 and 'id="login-link"' in r.text
    assert _get(client, "/no-such-page").status_code == 404
    assert client.get("/api/no-such-route").headers["content-type"] == "application/json"


# ----------------------------------------------------------------------------------------------------
# A submission
# ----------------------------------------------------------------------------------------------------


def _record(spec, seed: int, epochs: int = 2) -> dict:
    """A run's stored result as the engine writes it (TrainResult.to_json)."""
    half = HalfMetrics(accuracy=0.6, per_class_accuracy=[0.6] * 10, ece=0.02, ece_temperature=0.01)
    rows = [EpochRow(epoch=e, epochs=epochs, train_loss=2.0 / e, steps=10, partial=False, lr=0.05, seconds=e * 3.0,
                     images_per_sec=500.0, test_accuracy=0.3 * e) for e in range(1, epochs + 1)]
    return TrainResult(
        status=Outcome.succeeded, stop_reason=StopReason.completed, epochs_planned=epochs, epochs_completed=epochs,
        steps_completed=10 * epochs, steps_planned=10 * epochs, train_loss_final=1.0, micro_batch_size=32,
        effective_batch_size=32, precision="bf16", channels_last=True, memory_format_note=None,
        compile=CompileInfo(enabled=False, seconds=0.0, counted=False), history=rows, accuracy=0.6,
        private_accuracy=0.7777777, metrics=Metrics(temperature=1.5, accuracy_all=0.65, public=half, private=half),
        images_per_sec=500.0, timings=Timings(setup_seconds=1.25, train_seconds=6.5, eval_seconds=0.75,
                                              epoch_eval_seconds=0.5),
        device_seconds=7.25, device=DeviceInfo(type="cuda", name="NVIDIA H200"), peak_memory_bytes=1,
        versions=Versions(torch="2", torchvision="0", cuda=None, cudnn=None, python="3", hparena="x"),
        test_split=TestSplit(public=50, private=50),
        dataset=DatasetInfo(source="x", content_hash="x", train=100, test=100, classes=[str(i) for i in range(10)]),
        spec=spec).to_json()


def _claim(submission_id: int) -> list[run_service.Claimed]:
    with session_scope() as s:
        ids = list(s.scalars(select(Run.id).where(Run.submission_id == submission_id).order_by(Run.seed)))
    out = []
    for run_id in ids:
        with session_scope() as s:
            out.append(run_service.claim(s, run_id, "test-worker", stale_after=60, max_attempts=3))
    return out


def test_a_submission_page_follows_its_runs_epoch_by_epoch_to_the_result(client, db, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, seeds=[0, 1])
    me, other = join(client, comp["slug"], name="me"), join(client, comp["slug"], name="other")
    sub = submit(client, comp, me, lr=0.05, batch_size=32, epochs=2)
    url = f"/submissions/{sub['id']}"

    queued = _get(client, url, me)
    assert queued.status_code == 200, queued.text
    assert 'id="status" class="status-queued" data-status="queued"' in queued.text
    for el in ('id="queue-position"', 'id="eta"', 'id="device"', 'id="precision"', 'id="timings"',
               'id="config"', '<canvas id="chart-loss"', '<canvas id="chart-accuracy"', '<canvas id="chart-lr"',
               'id="epochs"', 'data-page="submission"', "/static/vendor/chartjs/chart.umd.min.js"):
        assert el in queued.text, el
    assert '"lr": 0.05' in queued.text

    claims = _claim(sub["id"])
    with session_scope() as s:  # the workers set up (SetupEvent) before their first step
        for c in claims:
            run_service.record_setup(s, c, "fp16", 2.5)
    # Set up, no epoch yet: the precision and setup time show already, training time not yet.
    api = client.get(f"/api/submissions/{sub['id']}", headers=me).json()["runs"]
    assert [(r["precision"], r["setup_seconds"], r["train_seconds"], r["result"]) for r in api] == [
        ("fp16", 2.5, None, None)] * 2
    live = _get(client, f"{url}/live.json", me).json()
    assert [(r["precision"], r["timings"]) for r in live["runs"]] == [
        ("fp16", {"setup": 2.5, "train": None, "eval": None})] * 2
    assert re.search(r'id="precision">fp16<', live["html"]) and 'class="num setup">2.5 s<' in live["html"]

    for c in claims:  # two seeds, one epoch each so far
        with session_scope() as s:
            run_service.record_epoch(s, c, EpochRow(epoch=1, epochs=2, train_loss=2.0, steps=10, partial=False,
                                                    lr=0.05, seconds=3.0, images_per_sec=500.0,
                                                    test_accuracy=0.3), 0.5)
    live = _get(client, f"{url}/live.json", me).json()
    assert live["status"] == "running" and live["terminal"] is False
    assert [r["label"] for r in live["runs"]] == ["seed 0", "seed 1"]
    assert [[(e["epoch"], e["train_loss"], e["test_accuracy"], e["lr"]) for e in r["epochs"]]
            for r in live["runs"]] == [[(1, 2.0, 0.3, 0.05)]] * 2
    assert live["html"].count('class="epoch"') == 2 and 'data-status="running"' in live["html"]
    assert [r["timings"] for r in live["runs"]] == [{"setup": 2.5, "train": 3.0, "eval": None}] * 2
    assert live["html"].count('class="num train">3.0 s <span class="muted">so far</span><') == 2
    running = _get(client, url, me).text
    assert re.search(r'id="precision">fp16<', running) and 'class="num setup">2.5 s<' in running
    api = client.get(f"/api/submissions/{sub['id']}", headers=me).json()["runs"]
    assert [(r["precision"], r["setup_seconds"], r["train_seconds"]) for r in api] == [("fp16", 2.5, 3.0)] * 2

    for c in claims:
        with session_scope() as s:
            assert run_service.finish(s, c, RunStatus.succeeded, accuracy=0.6, private_accuracy=0.7777777,
                                      gpu_seconds=7.25, result=_record(c.spec, c.spec.seed)) is None
    done = _get(client, url, me).text
    assert 'data-status="succeeded"' in done and 'id="failure"' not in done
    assert re.search(r'id="device">NVIDIA H200 \(cuda\)<', done)
    assert re.search(r'id="precision">bf16<', done)
    assert "1.2 s" in done and "6.5 s" in done and "0.8 s" in done  # setup, train, eval
    assert "77.78" not in done and "0.7777777" not in done  # the run's private accuracy stays hidden
    live = _get(client, f"{url}/live.json", me).json()
    assert live["terminal"] is True
    assert live["runs"][0]["timings"] == {"setup": 1.25, "train": 6.5, "eval": 0.75}
    assert "so far" not in live["html"]
    # The API's run fields say what the result says once it is over.
    api = client.get(f"/api/submissions/{sub['id']}", headers=me).json()["runs"]
    assert [r["train_seconds"] for r in api] == [6.5] * 2
    assert "0.7777777" not in str(live)

    # Another team gets the API's 404; the organizer sees it; a signed-out browser is sent to sign in.
    assert _get(client, url, other).status_code == 404
    assert _get(client, f"{url}/live.json", other).status_code == 404
    assert client.get(f"/api/submissions/{sub['id']}", headers=other).status_code == 404
    assert _get(client, url, org).status_code == 200
    signed_out = _get(client, url)
    assert signed_out.status_code == 303
    assert signed_out.headers["location"] == f"/login?next=%2Fsubmissions%2F{sub['id']}"
    assert _get(client, f"{url}/live.json").status_code == 401


def test_a_retried_attempt_shows_its_own_setup_not_its_predecessors(client, db, admin_headers):
    comp = make_competition(client, make_organizer(client, admin_headers))
    me = join(client, comp["slug"], name="me")
    sub = submit(client, comp, me, lr=0.05, batch_size=32)
    (first,) = _claim(sub["id"])
    with session_scope() as s:
        run_service.record_setup(s, first, "bf16", 4.0)
        assert run_service.retry(s, first, "the node went away", max_attempts=3) == RunStatus.queued
    (second,) = _claim(sub["id"])
    run = client.get(f"/api/submissions/{sub['id']}", headers=me).json()["runs"][0]
    assert (run["attempts"], run["precision"], run["setup_seconds"]) == (2, None, None)
    with session_scope() as s:
        run_service.record_setup(s, first, "bf16", 4.0)  # the lost attempt, late: fenced off
        run_service.record_setup(s, second, "fp32", 1.5)
    run = client.get(f"/api/submissions/{sub['id']}", headers=me).json()["runs"][0]
    assert (run["precision"], run["setup_seconds"]) == ("fp32", 1.5)


def test_a_failure_is_said_in_plain_words(client, db, admin_headers):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    me = join(client, comp["slug"], name="me")
    sub = submit(client, comp, me, lr=0.05, batch_size=32)
    (c,) = _claim(sub["id"])
    with session_scope() as s:
        run_service.finish(s, c, RunStatus.failed, failure_kind=FailureKind.infrastructure,
                           error="the worker was lost")
    page = _get(client, f"/submissions/{sub['id']}", me).text
    assert 'data-status="failed"' in page
    assert re.search(r'id="failure"[^>]*>infrastructure: the worker was lost; retried automatically and refunded',
                     page)
    live = _get(client, f"/submissions/{sub['id']}/live.json", me).json()["failure"]
    assert live.startswith("infrastructure:")
    # The page, the API and so the student CLI say it in the same words.
    assert client.get(f"/api/submissions/{sub['id']}", headers=me).json()["failure_reason"] == live


@pytest.mark.parametrize("path", ["/submissions/999999", "/submissions/abc", "/submissions/0", "/submissions/-1",
                                  "/submissions/99999999999999", "/submissions/1/live.json/x"])
def test_submission_errors_are_4xx(client, db, admin_headers, path):
    r = _get(client, path, admin_headers)
    assert 400 <= r.status_code < 500, (path, r.status_code)


# ----------------------------------------------------------------------------------------------------
# Assets
# ----------------------------------------------------------------------------------------------------


def test_assets_are_served_by_the_app_and_no_page_loads_anything_from_elsewhere(client, db, admin_headers):
    for path in ("/static/vendor/chartjs/chart.umd.min.js", "/static/js/poll.js", "/static/js/board.js",
                 "/static/js/submission.js"):
        r = client.get(path)
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], path
    assert "text/css" in client.get("/static/css/hparena.css").headers["content-type"]

    comp, org, teams, subs = _world(client, admin_headers)
    pages = ["/", "/login", f"/competitions/{comp['slug']}", "/competitions/nope", f"/submissions/{subs['t1']}"]
    for who in (None, teams["t1"], org):
        for url in pages:
            r = _get(client, url, who)
            assert r.status_code < 500, (url, r.status_code)
            assert not re.search(r'(src|href|action)\s*=\s*"\s*(https?:)?//', r.text), url
