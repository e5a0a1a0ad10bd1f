"""The student CLI (`hparena login/submit/status/leaderboard/cancel`) against the real API app.

The commands run through Typer's CliRunner; their HTTP goes through the app's TestClient (an httpx.Client,
handed to the command as the context's obj), so every request hits the real routes and both databases.
"""

from __future__ import annotations

import json
import stat

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tests.e2e.services import free_port
from tests.factories import finish_runs, join, make_competition, make_organizer
from worker import watch
from worker.cli import cli
from worker.client import SubmissionView, cleartext_warning

runner = CliRunner()
URL = "http://testserver"  # the TestClient's host


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A config directory of the test's own (click's get_app_dir follows XDG_CONFIG_HOME), and wide tables."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


@pytest.fixture
def arena(client, admin_headers, home):
    """A competition with lr in [1e-05, 1.0] and a student logged in to it: (competition, student headers)."""
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, search_space={"lr": {"min": 1e-05, "max": 1.0},
                                                       "batch_size": {"choices": [32, 64]}})
    student = join(client, comp["slug"], "alice")
    token = student["Authorization"].removeprefix("Bearer ")
    r = hp(client, "login", URL, token)
    assert r.exit_code == 0, r.output
    return comp, student


def hp(client, *args: str):
    return runner.invoke(cli, list(args), obj=client)


def write(home, name: str, text: str) -> str:
    path = home / name
    path.write_text(text)
    return str(path)


def test_login_stores_the_server_and_token_readable_only_by_the_user(client, admin_headers, home):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org)
    token = join(client, comp["slug"], "bob")["Authorization"].removeprefix("Bearer ")

    r = hp(client, "login", URL + "/", token)
    assert r.exit_code == 0, r.output
    assert "logged in to http://testserver as bob (participant)" in r.stdout
    stored = home / "config" / "hparena" / "config.json"
    assert json.loads(stored.read_text()) == {"url": URL, "token": token}
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


def test_login_with_an_unknown_token_says_so_and_stores_nothing(client, home):
    r = hp(client, "login", URL, "not-a-token")
    assert r.exit_code == 1
    assert "does not know this token" in r.stderr and "Traceback" not in r.output
    assert not (home / "config" / "hparena" / "config.json").exists()


def test_out_of_range_config_is_refused_locally_and_nothing_is_sent(client, arena, home):
    comp, student = arena
    cfg = write(home, "bad.yaml", f"competition: {comp['slug']}\nconfig: {{lr: 5.0, batch_size: 48, epochs: 9}}\n")
    r = hp(client, "submit", cfg)
    assert r.exit_code == 2, r.output
    assert "lr 5.0 is outside [1e-05, 1.0] in this competition" in r.stderr
    assert "batch_size 48 is not one of [32, 64] in this competition" in r.stderr
    assert "epochs 9 is outside [1, 3] in this competition" in r.stderr  # the budget's max_epochs
    assert "nothing was submitted" in r.stderr
    # The engine's own bounds, before the competition's: a typo'd name and a negative lr.
    r = hp(client, "submit", write(home, "typo.yaml", "lrr: 0.1\nlr: -1\n"), "--competition", comp["slug"])
    assert r.exit_code == 2 and "lrr: Extra inputs are not permitted" in r.stderr and "lr: Input should be" in r.stderr
    assert client.get("/api/submissions", headers=student).json() == []


def test_submit_status_leaderboard_and_cancel_with_tables_and_json(client, arena, home):
    comp, student = arena
    slug = comp["slug"]
    bare = write(home, "hp.yaml", "lr: 0.05\nbatch_size: 32\n")

    r = hp(client, "submit", bare, "-c", slug)
    assert r.exit_code == 0, r.output
    first = client.get("/api/submissions", headers=student).json()[0]
    assert f"submitted #{first['id']} to {slug} (1 seed): queue position 0" in r.stdout
    assert first["config"]["lr"] == 0.05 and first["config"]["epochs"] == 3  # unset epochs: the whole budget

    r = hp(client, "submit", write(home, "w.yaml", f"competition: {slug}\nconfig: {{lr: 0.1, batch_size: 64}}\n"),
           "--json")
    assert r.exit_code == 0, r.output
    second = json.loads(r.stdout)
    assert second["status"] == "queued" and second["config"]["batch_size"] == 64

    # status: the list and one submission, as tables and as the API's JSON
    r = hp(client, "status")
    assert r.exit_code == 0, r.output
    assert "Your submissions" in r.stdout and slug in r.stdout and "queue position" in r.stdout
    r = hp(client, "status", "--json")
    assert json.loads(r.stdout) == client.get("/api/submissions", headers=student).json()
    r = hp(client, "status", str(first["id"]))
    assert r.exit_code == 0 and f"Submission #{first['id']}" in r.stdout
    assert "batch_size=32, epochs=3, lr=0.05" in r.stdout  # the config, besides the engine's defaults
    r = hp(client, "status", str(first["id"]), "--json")
    assert json.loads(r.stdout)["runs"][0]["seed"] == 0

    # leaderboard, once the first has a score (landed as a worker lands it)
    finish_runs(first["id"], [{"accuracy": 0.6125, "private_accuracy": 0.6, "gpu_seconds": 90.0}])
    r = hp(client, "leaderboard", slug)
    assert r.exit_code == 0, r.output
    assert "public board (open)" in r.stdout and "team-alice" in r.stdout and "0.6125" in r.stdout
    r = hp(client, "leaderboard", slug, "--json")
    board = json.loads(r.stdout)
    assert board["entries"][0]["submission_id"] == first["id"] and board["entries"][0]["accuracy"] == 0.6125
    r = hp(client, "status", str(first["id"]))
    assert "0.6125" in r.stdout and "succeeded" in r.stdout

    # cancel: the second, as a table line; cancelling again is a plain sentence, and so is JSON's cancel
    r = hp(client, "cancel", str(second["id"]))
    assert r.exit_code == 0 and f"cancelled #{second['id']}: now cancelled" in r.stdout
    r = hp(client, "cancel", str(second["id"]))
    assert r.exit_code == 1 and f"submission {second['id']} is already cancelled" in r.stderr
    other = write(home, "t.yaml", "lr: 0.2\nbatch_size: 64\n")
    third = json.loads(hp(client, "submit", other, "-c", slug, "--json").stdout)
    r = hp(client, "cancel", str(third["id"]), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "cancelled"
    r = hp(client, "status", "999999")
    assert r.exit_code == 1 and "no submission 999999 of yours" in r.stderr


def test_a_used_quota_says_when_it_resets(client, admin_headers, home):
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, submission_quota=1, quota_window_hours=3.2)
    token = join(client, comp["slug"], "carol")["Authorization"].removeprefix("Bearer ")
    assert hp(client, "login", URL, token).exit_code == 0
    cfg = write(home, "q.yaml", f"competition: {comp['slug']}\nconfig: {{lr: 0.05, batch_size: 32}}\n")
    assert hp(client, "submit", cfg).exit_code == 0

    r = hp(client, "submit", cfg)
    assert r.exit_code == 1
    assert "quota resets in 3 h 12 min" in r.stderr  # Retry-After: 11520 s
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output


def test_an_unreachable_server_is_named(client, home):
    url = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there
    r = runner.invoke(cli, ["login", url, "some-token"])
    assert r.exit_code == 1 and f"server unreachable at {url}" in r.stderr
    r = runner.invoke(cli, ["leaderboard", "any", "--server", url])
    assert r.exit_code == 1 and f"server unreachable at {url}" in r.stderr
    assert isinstance(r.exception, SystemExit)


def test_not_logged_in_and_a_revoked_token_point_at_login(client, arena, home):
    comp, student = arena
    (home / "config" / "hparena" / "config.json").unlink()
    r = hp(client, "status")
    assert r.exit_code == 1 and "not logged in: run hparena login URL TOKEN" in r.stderr

    token = student["Authorization"].removeprefix("Bearer ")
    assert hp(client, "login", URL, token).exit_code == 0
    assert client.delete("/api/me/token", headers=student).status_code == 204
    r = hp(client, "status")
    assert r.exit_code == 1 and "not logged in: run hparena login URL TOKEN" in r.stderr
    assert "refused the token" in r.stderr and isinstance(r.exception, SystemExit)


EVIL_TEAM = "[/x] [link=https://evil.example]click[/link]"


def test_server_strings_print_as_text_not_rich_markup(client, admin_headers, home):
    """A team name or a title is the server's data: brackets in it are shown as typed, never read as markup
    (an unbalanced '[/x]' would otherwise end the command with a MarkupError)."""
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, title="[bold]Arena[/] [/x]")
    token = join(client, comp["slug"], "mallory", team=EVIL_TEAM)["Authorization"].removeprefix("Bearer ")
    assert hp(client, "login", URL, token).exit_code == 0
    r = hp(client, "submit", write(home, "m.yaml", "lr: 0.05\nbatch_size: 32\n"), "-c", comp["slug"], "--json")
    assert r.exit_code == 0, r.output
    sub = json.loads(r.stdout)
    finish_runs(sub["id"], [{"accuracy": 0.5, "private_accuracy": 0.5, "gpu_seconds": 60.0}])

    r = hp(client, "leaderboard", comp["slug"])
    assert r.exit_code == 0, r.output
    assert EVIL_TEAM in r.stdout and "[bold]Arena[/] [/x]: public board" in r.stdout
    r = hp(client, "status")
    assert r.exit_code == 0, r.output
    r = hp(client, "status", str(sub["id"]))
    assert r.exit_code == 0, r.output

    # --watch's live display: the server's eta_note in the spinner's line
    view = SubmissionView.of({**sub, "status": "running", "eta_seconds": None, "eta_note": "[/x] no worker; …"})
    console = Console(record=True, width=200, markup=False)
    console.print(watch._render(view))
    assert "ETA unknown ([/x] no worker)" in console.export_text()


def test_a_token_sent_over_plain_http_to_another_machine_is_warned_about(client, arena, home):
    comp, student = arena
    token = student["Authorization"].removeprefix("Bearer ")
    warning = "warning: http://testserver is plain http: your token crosses the network unencrypted"
    r = hp(client, "login", "testserver", token)  # no scheme: http:// is assumed, and said to be cleartext
    assert r.exit_code == 0, r.output
    assert r.stderr.count(warning) == 1 and len(r.stderr.splitlines()) == 1
    r = hp(client, "status")  # the stored http URL, each time it is used with the token
    assert r.exit_code == 0 and warning in r.stderr
    r = hp(client, "leaderboard", comp["slug"], "--server", "http://other")  # no token goes: nothing to warn
    assert r.exit_code == 0 and r.stderr == ""

    r = hp(client, "login", "localhost:8000", token)  # this machine: nothing crosses a network
    assert r.exit_code == 0 and r.stderr == ""
    assert hp(client, "status").stderr == ""


@pytest.mark.parametrize("url", ["https://arena.example.edu", "http://localhost:8000", "http://127.0.0.1",
                                 "http://127.8.0.1:80", "http://[::1]:8000", "http://api.localhost"])
def test_https_and_this_machine_need_no_cleartext_warning(url):
    assert cleartext_warning(url) is None


@pytest.mark.parametrize("url", ["http://arena.example.edu", "http://10.0.0.5:8000", "http://[2001:db8::1]"])
def test_plain_http_to_another_machine_is_warned_about(url):
    assert cleartext_warning(url).startswith(f"warning: {url} is plain http")
