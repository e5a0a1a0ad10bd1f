"""The one Jinja2 environment every page renders with (autoescaped HTML), the filters that format numbers the
same way on every page, and the route class that turns a service's domain error into an error page."""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import DomainError, Unauthorized
from app.http import STATUS_OF

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


# ----------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def percent(x: float | None, digits: int = 2) -> str:
    """An accuracy (0..1) as a percentage: 0.93412 -> "93.41"."""
    return f"{x * 100:.{digits}f}" if _finite(x) else "—"


def number(x: float | None, digits: int = 3) -> str:
    """A figure to `digits` significant digits ("—" when unknown)."""
    if not _finite(x):
        return "—"
    return f"{x:.{digits}g}" if x != 0 else "0"


def seconds(x: float | None) -> str:
    """A duration: "42.1 s", "3 min 12 s", "2 h 05 min"."""
    if not _finite(x):
        return "—"
    if x < 60:
        return f"{x:.1f} s"
    m, s = divmod(round(x), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def when(x: datetime | str | None) -> str:
    """A time in UTC, to the minute: "2025-03-01 14:05 UTC"."""
    if x is None:
        return "—"
    if isinstance(x, str):
        x = datetime.fromisoformat(x)
    return x.strftime("%Y-%m-%d %H:%M UTC")


def iso(x: datetime | str | None) -> str:
    if x is None:
        return ""
    return x if isinstance(x, str) else x.isoformat()


templates.env.filters.update(percent=percent, number=number, seconds=seconds, when=when, iso=iso)
# How often a live page (board, submission, admin) polls its JSON for news: every template's `poll_ms`.
templates.env.globals["poll_ms"] = 2000


# ----------------------------------------------------------------------------------------------------
# Rendering and errors
# ----------------------------------------------------------------------------------------------------


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render page `name`. Every page gets `request` and `user` (who is signed in, or None; set by
    dependencies.page_user, so an error page rendered outside a route still knows)."""
    context.setdefault("user", getattr(request.state, "page_user", None))
    return templates.TemplateResponse(request, name, {"request": request, **context}, status_code=status_code)


_TITLES = {400: "Bad request", 401: "Sign in needed", 403: "Not allowed", 404: "Not found", 405: "Not allowed",
           409: "Conflict", 413: "Too large", 422: "Bad request", 429: "Too many requests"}


def error_page(request: Request, status: int, detail: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    response = render(request, "error.html", status_code=status, status=status,
                      title=_TITLES.get(status, "Error"), detail=detail)
    response.headers.update(headers or {})
    return response


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("path", "query", "cookie", "body"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "malformed request"


def login_url(request: Request) -> str:
    """/login, coming back to this page once signed in."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/login?{urlencode({'next': here})}"


class PageRoute(APIRoute):
    """A page's route: a service's domain error (no such competition, not yours) or a malformed path or query
    becomes the HTML error page with the status the API would answer; Unauthorized (signed out: see
    dependencies.SignedIn) sends the browser to /login and back. A route whose path ends in `.json` (a
    page's polled data) answers as the API does instead, with the app's JSON handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.path.endswith(".json"):
            async def data(request: Request) -> Response:
                return _harden(await handler(request))

            return data

        async def route(request: Request) -> Response:
            return _harden(await _page(request))

        async def _page(request: Request) -> Response:
            try:
                return await handler(request)
            except Unauthorized:
                return RedirectResponse(login_url(request), status_code=303)
            except DomainError as exc:
                status = next((STATUS_OF[k] for k in type(exc).__mro__ if k in STATUS_OF), None)
                if status is None:
                    raise
                return error_page(request, status, exc.detail)
            except RequestValidationError as exc:
                # A path parameter no object can have (/submissions/abc) names nothing: not found.
                path = any(e.get("loc", ("",))[0] == "path" for e in exc.errors())
                return error_page(request, 404 if path else 422, _validation_detail(exc))

        return route


# Every script, style and chart comes from this app (static/), so the browser may load nothing from
# elsewhere, run no inline script, and show the page in no frame (no clickjacking of the sign-in form).
# Signed-in pages and their polled JSON hold a team's own data: no cache keeps them.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "private, no-store",
}


def _harden(response: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    return response


def cross_site(request: Request) -> bool:
    """A form posted from another site: the browser says so (Sec-Fetch-Site), or its Origin is not this host.
    Signing in or out is refused then, so another site can't sign a visitor into its own account or out."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:  # not a browser's cross-origin form (those send one): curl, a script
        return False
    return origin == "null" or urlsplit(origin).netloc != request.headers.get("host", "")


def wants_html(request: Request) -> bool:
    """A browser asking for a page (not the API, not a page's JSON, not a script)."""
    path = request.url.path
    return (not path.startswith(("/api/", "/static/")) and not path.endswith(".json")
            and "text/html" in request.headers.get("accept", ""))


async def http_error_page(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such path, wrong method) as a page for a browser; JSON for anyone else."""
    assert isinstance(exc, StarletteHTTPException)
    if wants_html(request):
        return error_page(request, exc.status_code, str(exc.detail), exc.headers)
    return await http_exception_handler(request, exc)


def fragment(name: str, **context: Any) -> str:
    """A partial template rendered on its own: what a page's polled JSON carries to replace part of the page
    (the same markup the page was first rendered with, so a live update never looks different)."""
    return templates.get_template(name).render(**context)
