"""A student's commands: `hparena login`, `submit [--watch]`, `status`, `leaderboard` and `cancel`.

They talk to the JSON API through worker.client and print Rich tables, or the API's JSON with `--json`.
Errors go to stderr as one sentence each (exit 1; 2 for a file that fails the local checks), never as a
traceback. `submit` checks the file against the competition's search space and budget with the server's own
check (check_in_space) before anything is sent, so a config the server would refuse costs no quota.
`--watch`'s polling and live display are worker/watch.py.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table

from worker.client import (
    LOGIN_HINT,
    ApiError,
    ArenaClient,
    BoardView,
    CompetitionView,
    Login,
    NotLoggedIn,
    SubmissionView,
    cleartext_warning,
    load_login,
    normalize_url,
    outside_message,
    save_login,
)
from worker.watch import TERMINAL, acc_text, eta_text, queue_line, watch_submission

PANEL = "Students"

ServerOpt = Annotated[str | None, typer.Option("--server", help="API URL (default: the one you logged in to).")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Bearer token (default: the stored one).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table (for scripts).")]


def register(cli: typer.Typer) -> None:
    for command in (login, submit, status, leaderboard, cancel):
        cli.command(rich_help_panel=PANEL)(command)


class Invalid(Exception):
    """A local check refused the input before anything was sent; one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# ----------------------------------------------------------------------------------------------------
# Plumbing: consoles, errors, the connection
# ----------------------------------------------------------------------------------------------------


def _consoles() -> tuple[Console, Console]:
    """stdout's and stderr's consoles, made per command so a test's COLUMNS (and a redirected stdout) apply.

    Markup and emoji codes are off for every string they render, table cells and titles included: nearly every
    string here is the server's (team names, titles, errors, configs), and a team named '[/x]' must print as
    typed, not end the command with a MarkupError (or '[link=...]' turn into a link, ':x:' into an emoji)."""
    return (Console(highlight=False, markup=False, emoji=False),
            Console(stderr=True, highlight=False, markup=False, emoji=False))


@contextmanager
def _connected(ctx: typer.Context, server: str | None, token: str | None, *,
               need_token: bool = True) -> Iterator[tuple[Console, ArenaClient]]:
    """A command's stdout console and its client; a refusal on the way prints as one sentence on stderr."""
    out, err = _consoles()
    with _reported(err), _connect(ctx, server, token, need_token=need_token) as api:
        yield out, api


@contextmanager
def _reported(err: Console) -> Iterator[None]:
    try:
        yield
    except Invalid as e:
        _say(err, e.lines)
        raise typer.Exit(2) from None
    except ApiError as e:
        _say(err, str(e).splitlines())
        raise typer.Exit(1) from None


def _say(err: Console, lines: list[str]) -> None:
    for i, line in enumerate(lines):
        err.print(("error: " if i == 0 else "       ") + line, markup=False, soft_wrap=True)


def _http(ctx: typer.Context) -> httpx.Client | None:
    """An httpx client handed in as the context's obj (tests: the app's TestClient); else the client's own."""
    return ctx.obj if isinstance(ctx.obj, httpx.Client) else None


def _connect(ctx: typer.Context, server: str | None, token: str | None, *, need_token: bool = True) -> ArenaClient:
    stored = load_login()
    url = normalize_url(server) if server else (stored.url if stored else None)
    if url is None:
        raise NotLoggedIn(f"not logged in: {LOGIN_HINT} (or pass --server URL)")
    if token is None and stored is not None and stored.url == url:  # never send a token to another server
        token = stored.token
    if need_token and not token:
        raise NotLoggedIn(f"not logged in: {LOGIN_HINT}")
    if token:
        _warn_cleartext(url)
    return ArenaClient(url, token, http=_http(ctx))


def _warn_cleartext(url: str) -> None:
    if warning := cleartext_warning(url):
        _consoles()[1].print(warning, soft_wrap=True)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _when(dt: datetime | None) -> str:
    if dt is None:
        return "-"
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone().strftime("%Y-%m-%d %H:%M")


# ----------------------------------------------------------------------------------------------------
# hparena login
# ----------------------------------------------------------------------------------------------------


def login(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The hparena server, e.g. https://arena.example.edu")],
    token: Annotated[str, typer.Argument(help="Your bearer token ('-': read it from stdin, out of shell "
                                              "history)")],
) -> None:
    """Check the server and token (GET /api/me), then store both in your config directory (0600)."""
    out, err = _consoles()
    if token == "-":
        token = sys.stdin.readline().strip()
    with _reported(err), ArenaClient(url, token, http=_http(ctx)) as api:
        _warn_cleartext(api.url)
        try:
            me = api.me()
        except NotLoggedIn:
            raise ApiError(f"the server at {api.url} does not know this token: check that you copied it "
                           "whole, or ask your organizer for a new one") from None
        path = save_login(Login(url=api.url, token=token))
    out.print(f"logged in to {api.url} as {me.name} ({me.role}); saved to {path}", markup=False)


# ----------------------------------------------------------------------------------------------------
# hparena submit: read, check locally, send, watch
# ----------------------------------------------------------------------------------------------------


def read_submission(path: Path, competition: str | None) -> tuple[str, dict[str, Any]]:
    """(competition slug, hyperparameters) from a YAML/JSON file holding the hyperparameters (a bare mapping)
    or {competition: slug, config: {...}}; --competition wins over the file's."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise Invalid([f"{path} cannot be read as YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise Invalid([f"{path} must hold a mapping of hyperparameters"])
    if {"competition", "config"} & set(raw):
        unknown = sorted(set(raw) - {"competition", "config"})
        if unknown:
            raise Invalid([f"{path}: unknown keys {', '.join(map(str, unknown))}; a submission file holds "
                           "either bare hyperparameters or {competition: SLUG, config: {...}}"])
        values = raw.get("config") or {}
        if not isinstance(values, dict):
            raise Invalid([f"{path}: config must be a mapping of hyperparameters"])
        slug = competition or raw.get("competition")
    else:
        values, slug = raw, competition
    if not slug:
        raise Invalid([f"which competition? pass --competition SLUG or put 'competition: SLUG' in {path}"])
    return str(slug), values


def check_locally(values: dict[str, Any], comp: CompetitionView):
    """The TrainConfig the server would build, or Invalid with every problem: the engine's own bounds, then the
    competition's search space and budget, checked by the very function the server runs (check_in_space)."""
    from pydantic import ValidationError

    from worker.engine.config import TrainConfig, check_in_space

    try:
        cfg = TrainConfig.model_validate(values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(map(str, err["loc"]))
            got = f" (got {err['input']!r})" if field else ""
            lines.append(f"{field + ': ' if field else ''}{err['msg']}{got}")
        raise Invalid([*lines, "nothing was submitted"]) from None
    violations = check_in_space(cfg, comp.search_space, comp.budget)
    if violations:
        raise Invalid([*(outside_message(v.field, v.value, v.allowed) for v in violations),
                       "nothing was submitted"])
    return cfg


def submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML/JSON: hyperparameters, or "
                                         "{competition: SLUG, config: {...}}")],
    competition: Annotated[str | None, typer.Option("--competition", "-c", help="Competition slug (overrides "
                                                    "the file's)")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow it live until it is scored; exit 0 only "
                                        "if it succeeded")] = False,
    json_out: JsonOpt = False,
    interval: Annotated[float, typer.Option(min=0.1, hidden=True, help="Seconds between polls")] = 2.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Check a config against the competition's search space, submit it, and optionally watch it train."""
    out, err = _consoles()
    with _reported(err):
        slug, values = read_submission(file, competition)
        with _connect(ctx, server, token) as api:
            comp = api.competition(slug)
            cfg = check_locally(values, comp)
            sub = api.submit(slug, cfg.model_dump(mode="json", exclude_unset=True), str(uuid.uuid4()))
            if not json_out:
                seeds = f"{len(comp.seeds)} seed{'s' if len(comp.seeds) != 1 else ''}"
                state = queue_line(sub) if sub.status == "queued" else sub.status
                out.print(f"submitted #{sub.id} to {slug} ({seeds}): {state}", markup=False, soft_wrap=True)
            if not watch:
                if json_out:
                    _print_json(sub.raw)
                return
            try:
                final = watch_submission(api, sub, None if json_out else out, interval)
            except KeyboardInterrupt:
                err.print(f"stopped watching: submission #{sub.id} goes on (hparena status {sub.id})",
                          markup=False)
                raise typer.Exit(130) from None
    if json_out:
        _print_json(final.raw)
    else:
        _print_outcome(out, err, final)
    if final.status != "succeeded":
        raise typer.Exit(1)


def failure_reason(sub: SubmissionView) -> str:
    """Why a submission that is over did not succeed: the API's own words (failure_reason), the same the
    submission page shows."""
    return sub.failure_reason or sub.error or sub.status


def _score_line(sub: SubmissionView) -> str:
    runs = [r for r in sub.runs if r.round == 0] or sub.runs
    seeds = f"mean of {len(runs)} seeds" if len(runs) > 1 else "1 seed"
    hours = "-" if sub.gpu_seconds is None else f"{sub.gpu_seconds / 3600:.4f}"
    return (f"accuracy {acc_text(sub.accuracy, sub.accuracy_std)} (public half, {seeds}), "
            f"{hours} {sub.hours_unit}")


def _print_outcome(out: Console, err: Console, sub: SubmissionView) -> None:
    if sub.status == "succeeded":
        out.print(f"succeeded: {_score_line(sub)}", markup=False, soft_wrap=True)
    else:
        err.print(f"{sub.status}: {failure_reason(sub)}", markup=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------------
# hparena status / leaderboard / cancel
# ----------------------------------------------------------------------------------------------------


def status(
    ctx: typer.Context,
    submission_id: Annotated[int | None, typer.Argument(metavar="[ID]", help="A submission (default: list "
                                                        "yours)")] = None,
    competition: Annotated[str | None, typer.Option("--competition", "-c", help="List only this competition's")]
    = None,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """One submission in detail (its runs and epochs), or a table of your submissions."""
    with _connected(ctx, server, token) as (out, api):
        if submission_id is not None:
            sub = api.submission(submission_id)
            if json_out:
                _print_json(sub.raw)
            else:
                out.print(_detail_table(sub, _slugs(api)))
            return
        subs = api.submissions(competition)
        if json_out:
            _print_json([s.raw for s in subs])
        else:
            out.print(_list_table(subs, _slugs(api)))


def _slugs(api: ArenaClient) -> dict[int, str]:
    return {c.id: c.slug for c in api.competitions()}


def _detail_table(sub: SubmissionView, slugs: dict[int, str]) -> RenderableType:
    t = Table(title=f"Submission #{sub.id}", show_header=False)
    t.add_row("competition", slugs.get(sub.competition_id, str(sub.competition_id)))
    t.add_row("status", sub.status)
    if sub.status in TERMINAL - {"succeeded"}:
        t.add_row("reason", failure_reason(sub))
    if sub.status == "queued":
        t.add_row("queue", queue_line(sub))
    elif sub.status == "running":
        t.add_row("ETA", eta_text(sub).removeprefix("ETA "))
    t.add_row("accuracy (public)", acc_text(sub.accuracy, sub.accuracy_std))
    t.add_row(sub.hours_unit, "-" if sub.gpu_seconds is None else f"{sub.gpu_seconds / 3600:.4f}")
    t.add_row("submitted / finished", f"{_when(sub.created_at)} / {_when(sub.finished_at)}")
    t.add_row("config (besides defaults)", _config_text(sub.config))
    runs = Table(title="Runs")
    for col in ("seed", "status", "epochs", "accuracy", "device", "error"):
        runs.add_column(col)
    planned = sub.planned_epochs
    for r in sub.runs:
        runs.add_row(str(r.seed) + (f" (rescore {r.round})" if r.round else ""), r.status,
                     f"{len(r.epochs)}/{planned or '?'}", acc_text(r.accuracy), r.device_name or "-", r.error or "")
    return Group(t, runs) if sub.runs else t


def _config_text(config: dict[str, Any]) -> str:
    from worker.engine.config import TrainConfig

    defaults = TrainConfig().model_dump(mode="json")
    changed = {k: v for k, v in config.items() if k == "epochs" or defaults.get(k, object()) != v}
    return ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))


def _list_table(subs: list[SubmissionView], slugs: dict[int, str]) -> RenderableType:
    t = Table(title="Your submissions")
    for col in ("id", "competition", "status", "accuracy", "hours", "queue / ETA", "submitted"):
        t.add_column(col)
    for s in subs:
        live = queue_line(s) if s.status == "queued" else eta_text(s) if s.status == "running" else ""
        hours = "-" if s.gpu_seconds is None else f"{s.gpu_seconds / 3600:.4f} {s.hours_unit}"
        t.add_row(str(s.id), slugs.get(s.competition_id, str(s.competition_id)), s.status,
                  acc_text(s.accuracy, s.accuracy_std), hours, live, _when(s.created_at))
    return t


def leaderboard(
    ctx: typer.Context,
    slug: Annotated[str, typer.Argument(help="Competition slug")],
    private: Annotated[bool, typer.Option("--private", help="The private board (after the close)")] = False,
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """The competition's board (public by default); with your token your own team's configs show in --json."""
    with _connected(ctx, server, token, need_token=False) as (out, api):
        board = api.leaderboard(slug, "private" if private else "public")
    if json_out:
        _print_json(board.raw)
    else:
        out.print(_board_table(board))


def _board_table(b: BoardView) -> RenderableType:
    state = b.phase + (", frozen" if b.frozen else "") + (", updating" if b.stale else "")
    t = Table(title=f"{b.title}: {b.board} board ({state})", caption=f"as of {_when(b.computed_at)}")
    for col in ("#", "rank", "team", "accuracy", b.cost_unit, "subs", "last improvement", ""):
        t.add_column(col)
    private = b.board == "private"
    for e in b.entries:
        rank = "base" if e.baseline else "-" if e.rank is None else f"{e.rank}{'=' if e.tie else ''}"
        acc = acc_text(e.private_accuracy, e.private_accuracy_std) if private else acc_text(e.accuracy, e.accuracy_std)
        flags = " ".join(f for f, on in (("final", e.final), ("pareto", e.pareto)) if on)
        t.add_row(str(e.position), rank, e.team, acc, "-" if e.gpu_hours is None else f"{e.gpu_hours:.4f}",
                  str(e.submissions), _when(e.best_at), flags)
    return t


def cancel(
    ctx: typer.Context,
    submission_id: Annotated[int, typer.Argument(metavar="ID", help="The submission to cancel")],
    json_out: JsonOpt = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Cancel a queued or running submission (a running one is charged the time it ran)."""
    with _connected(ctx, server, token) as (out, api):
        sub = api.cancel(submission_id)
    if json_out:
        _print_json(sub.raw)
    else:
        out.print(f"cancelled #{sub.id}: now {sub.status}", markup=False)
