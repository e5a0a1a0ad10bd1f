"""The student CLI's door to the JSON API: a small typed client over httpx, and the stored login.

Every failure the API can answer (or the network can cause) becomes an `ApiError` whose message is a
sentence a student can act on; the commands print it, never a traceback. The replies are parsed into small
views holding the fields the CLI shows (the server's own schemas would import SQLAlchemy into every call);
each view keeps the API's JSON (`.raw`) for `--json`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlsplit

import httpx
import typer
from pydantic import BaseModel, ConfigDict, PrivateAttr

from worker.engine.config import Budget

LOGIN_HINT = "run hparena login URL TOKEN"


# ----------------------------------------------------------------------------------------------------
# Errors, in words
# ----------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request that did not get what it asked for; `str()` is the message to print."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(ApiError):
    """No HTTP answer at all: refused, timed out, or a name that does not resolve."""


class NotLoggedIn(ApiError):
    """No server or token to use, or a token the server does not know (401)."""


def duration(seconds: float) -> str:
    """'42 s', '4 min 5 s', '3 h 12 min', '2 d 3 h': rounded up, so a wait is never told short."""
    s = max(0, math.ceil(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m} min {r} s" if r else f"{m} min"
    h, m = divmod(math.ceil(s / 60), 60)
    if h < 48:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def outside_message(field: str, value: Any, allowed: dict[str, Any]) -> str:
    """One hyperparameter outside a competition's space, from a `Violation`'s `allowed` (or a 422's
    ctx.allowed, which carries the same): 'lr 5.0 is outside [1e-05, 1.0] in this competition'."""
    if "choices" in allowed:
        return f"{field} {value!r} is not one of {allowed['choices']} in this competition"
    lo, hi = allowed.get("min"), allowed.get("max")
    if lo is not None and hi is not None:
        return f"{field} {value!r} is outside [{lo!r}, {hi!r}] in this competition"
    if hi is not None:
        return f"{field} {value!r} is above the maximum {hi!r} in this competition"
    return f"{field} {value!r} is below the minimum {lo!r} in this competition"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:  # the other form HTTP allows: a date
        return (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError):
        return None


def _validation_lines(detail: Any) -> list[str]:
    """A 422's field errors: the field, and the allowed range when the server names it."""
    if not isinstance(detail, list):
        return [str(detail)]
    lines = []
    for e in detail:
        loc = [str(p) for p in e.get("loc", []) if p not in ("body", "config", "query", "path")]
        field = ".".join(loc) or "request"
        allowed = (e.get("ctx") or {}).get("allowed")
        if isinstance(allowed, dict):
            lines.append(outside_message(field, e.get("input"), allowed))
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict | list) else ""
            lines.append(f"{field}: {e.get('msg', 'invalid')}{got}")
    return lines


def _limit_message(body: dict[str, Any], response: httpx.Response) -> str:
    """429: the quota (Retry-After: when a slot frees), the rate limit (Retry-After: the window's end) or the
    GPU-hour budget (no Retry-After; the body's figures)."""
    detail = str(body.get("detail", "too many requests"))
    if "remaining_gpu_hours" in body:
        unit = "CPU-hours" if body.get("cost_unit") == "cpu-seconds" else "GPU-hours"
        return (f"GPU-hour budget: this entry needs about {body['predicted_gpu_hours']:.4f} {unit}, "
                f"{body['remaining_gpu_hours']:.4f} left of {body['budget_gpu_hours']:g}")
    wait = _retry_after(response)
    if detail.startswith("quota"):
        return f"quota resets in {duration(wait)} ({detail})" if wait is not None else detail
    if wait is not None:
        return f"rate limited: try again in {duration(wait)} ({detail})"
    return detail


def error_for(response: httpx.Response, url: str, had_token: bool) -> ApiError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "detail" not in body:
        if status >= 500:
            return ApiError(f"the server at {url} failed ({status} {response.reason_phrase})", status)
        return ApiError(f"{url} answered {status} {response.reason_phrase}, not in hparena's JSON: is it an "
                        "hparena server?", status)
    detail = body["detail"]
    if status == 401:
        why = f" (the server at {url} refused the token: {detail})" if had_token else ""
        return NotLoggedIn(f"not logged in: {LOGIN_HINT}{why}", status)
    if status == 429:
        return ApiError(_limit_message(body, response), status)
    if status == 422:
        return ApiError("\n".join(_validation_lines(detail)), status)
    return ApiError(str(detail), status)


# ----------------------------------------------------------------------------------------------------
# The stored login
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    url: str
    token: str


def normalize_url(url: str) -> str:
    """Without a scheme, http:// (a lab server on a bare host:port); `cleartext_warning` says what that costs."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def cleartext_warning(url: str) -> str | None:
    """One line to print before a token goes to `url` over plain http to another machine: anyone on the way
    can read it and submit as you. None for https, and for this machine (localhost, 127.0.0.0/8, ::1)."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return None
    host = (parts.hostname or "").rstrip(".")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost" or host.endswith(".localhost")
    if loopback:
        return None
    return (f"warning: {url} is plain http: your token crosses the network unencrypted "
            f"(use https://{parts.netloc} if the server has it)")


def config_file() -> Path:
    """The user's config directory (click's rules: $XDG_CONFIG_HOME/hparena on Linux)."""
    return Path(typer.get_app_dir("hparena")) / "config.json"


def load_login() -> Login | None:
    path = config_file()
    try:
        data = json.loads(path.read_text())
        return Login(url=normalize_url(data["url"]), token=str(data["token"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise NotLoggedIn(f"{path} is not a login this CLI wrote: {LOGIN_HINT} again") from None


def save_login(login: Login) -> Path:
    """Written 0600 (the token is a password) and replaced atomically."""
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": login.url, "token": login.token}, f)
    os.chmod(tmp, 0o600)  # an older tmp file keeps its mode through O_CREAT
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------
# What the API answers (the fields the CLI reads; the rest stays in .raw)
# ----------------------------------------------------------------------------------------------------


class _View(BaseModel):
    model_config = ConfigDict(extra="ignore")
    _raw: Any = PrivateAttr(None)

    @classmethod
    def of(cls, data: Any) -> Self:
        view = cls.model_validate(data)
        view._raw = data
        return view

    @property
    def raw(self) -> Any:
        """The API's JSON, as it came."""
        return self._raw


class Me(_View):
    id: int
    name: str
    role: str


class CompetitionView(_View):
    id: int
    slug: str
    title: str
    budget: Budget
    search_space: dict[str, Any]
    hardware_class: str
    seeds: list[int]


class EpochView(BaseModel):
    epoch: int
    train_loss: float | None
    test_accuracy: float | None


class RunView(BaseModel):
    id: int
    seed: int
    status: str
    round: int = 0
    progress: float
    accuracy: float | None
    gpu_seconds: float | None
    device_name: str | None
    worker_hostname: str | None
    error: str | None
    failure_kind: str | None
    diverged_epoch: int | None
    diverged_step: int | None
    epochs: list[EpochView] = []


class SubmissionView(_View):
    id: int
    competition_id: int
    status: str
    kind: str = "train"
    accuracy: float | None
    accuracy_std: float | None = None
    gpu_seconds: float | None
    cost_unit: str = "gpu-seconds"
    error: str | None
    failure_kind: str | None
    created_at: datetime
    finished_at: datetime | None
    config: dict[str, Any]
    queue_position: int | None = None
    eta_seconds: float | None = None
    eta_note: str | None = None
    runs: list[RunView] = []  # only in a single submission's detail
    failure_reason: str | None = None  # ditto: why it did not succeed, in words

    @property
    def planned_epochs(self) -> int | None:
        """The submission's config is stored resolved against the budget: its epochs are what each run trains."""
        epochs = self.config.get("epochs")
        return epochs if isinstance(epochs, int) else None

    @property
    def hours_unit(self) -> str:
        return "CPU-hours" if self.cost_unit == "cpu-seconds" else "GPU-hours"


class EntryView(BaseModel):
    position: int
    rank: int | None
    tie: bool
    team: str
    submission_id: int
    baseline: bool
    final: bool
    pareto: bool
    accuracy: float | None
    accuracy_std: float | None
    private_accuracy: float | None = None
    private_accuracy_std: float | None = None
    gpu_hours: float | None
    submissions: int
    best_at: datetime


class BoardView(_View):
    competition: str
    title: str
    board: str
    view: str
    phase: str
    frozen: bool
    stale: bool
    cost_unit: str
    computed_at: datetime
    entries: list[EntryView]


# ----------------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------------


class ArenaClient:
    """The JSON API at `url` as `token`. Pass `http` to send through a client of your own (tests pass the
    app's TestClient, itself an httpx.Client); it is then left open."""

    def __init__(self, url: str, token: str | None = None, *, http: httpx.Client | None = None,
                 timeout: float = 30.0) -> None:
        self.url, self.token, self.timeout = normalize_url(url), token, timeout
        self._own = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> Any:
        """The JSON the API answered, or ApiError with the reason in words."""
        sent = dict(headers or {})
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        try:
            response = self._http.request(method, self.url + path, json=body, params=params, headers=sent)
        except httpx.TimeoutException:
            raise Unreachable(f"the server at {self.url} did not answer within {self.timeout:g} s") from None
        except httpx.TransportError:
            raise Unreachable(f"server unreachable at {self.url}") from None
        if response.is_success:
            try:
                return response.json() if response.content else None
            except ValueError:
                raise ApiError(f"{self.url} answered without JSON: is it an hparena server?") from None
        raise error_for(response, self.url, had_token=bool(self.token))

    def me(self) -> Me:
        return Me.of(self.request("GET", "/api/me"))

    def competition(self, slug: str) -> CompetitionView:
        return CompetitionView.of(self.request("GET", f"/api/competitions/{quote(slug, safe='')}"))

    def competitions(self) -> list[CompetitionView]:
        return [CompetitionView.of(c) for c in self.request("GET", "/api/competitions")]

    def submit(self, slug: str, config: dict[str, Any], idempotency_key: str) -> SubmissionView:
        """One retry on a lost connection, under the same Idempotency-Key: if the first POST did land, the
        server answers with that submission instead of making (and charging) a second."""
        path = f"/api/competitions/{quote(slug, safe='')}/submissions"
        body, headers = {"config": config}, {"Idempotency-Key": idempotency_key}
        try:
            return SubmissionView.of(self.request("POST", path, body=body, headers=headers))
        except Unreachable:
            return SubmissionView.of(self.request("POST", path, body=body, headers=headers))

    def submission(self, submission_id: int) -> SubmissionView:
        return SubmissionView.of(self.request("GET", f"/api/submissions/{submission_id}"))

    def submissions(self, competition: str | None = None) -> list[SubmissionView]:
        params = {"competition": competition} if competition else None
        return [SubmissionView.of(s) for s in self.request("GET", "/api/submissions", params=params)]

    def leaderboard(self, slug: str, board: str = "public") -> BoardView:
        path = f"/api/competitions/{quote(slug, safe='')}/leaderboard"
        return BoardView.of(self.request("GET", path, params={"board": board}))

    def cancel(self, submission_id: int) -> SubmissionView:
        return SubmissionView.of(self.request("POST", f"/api/submissions/{submission_id}/cancel"))
