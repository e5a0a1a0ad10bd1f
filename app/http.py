"""The API's edges: one error body for every status, a request-size limit, and 422s that always encode.

Every error the API returns is `{"detail": ...}`: a string for 4xx raised by the services, a list of
field errors for 422 (the same shape FastAPI uses for validation). Services raise `app.errors` domain
errors; `domain_error_handler` is the one place that maps them to statuses. `error_responses` declares
the statuses in the OpenAPI document, so a client (or schemathesis) can rely on each one an endpoint
may return.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import (
    BudgetExceeded,
    Conflict,
    DomainError,
    Forbidden,
    InvalidField,
    NotFound,
    OutsideSearchSpace,
    QuotaExceeded,
    RateLimited,
    Unauthorized,
)
from worker.engine.config import Violation


class ErrorOut(BaseModel):
    detail: str


class LimitErrorOut(ErrorOut):
    """A 429. When the GPU-hour budget refused the entry (app.costs.check_budget), the figures too."""

    budget_gpu_hours: float | None = Field(None, description="The team's GPU-hour budget in this competition.")
    remaining_gpu_hours: float | None = Field(None, description="What is left of it: budget - spent - reserved.")
    remaining_seconds: float | None = Field(None, description="The same, in device-seconds.")
    spent_seconds: float | None = Field(None, description="Device-seconds charged for the team's finished runs.")
    reserved_seconds: float | None = Field(None, description="Device-seconds predicted for its queued and running "
                                                             "runs.")
    predicted_seconds: float | None = Field(None, description="What this entry was predicted to cost.")
    predicted_gpu_hours: float | None = None
    cost_unit: str | None = Field(None, description="gpu-seconds, or cpu-seconds on a CPU hardware class.")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrorOut(BaseModel):
    detail: list[FieldError]


_DESCRIPTIONS = {
    400: "Malformed request (for example an unreadable Content-Length)",
    401: "Missing or invalid bearer token",
    403: "The token's role or team may not do this",
    404: "No such object (or not yours)",
    409: "Conflicts with the current state",
    413: "Request body over the size limit",
    422: "A field is invalid: `loc` names it, `msg` says the allowed values",
    429: "Quota used or rate limit hit (Retry-After says in how many seconds to try again), or the entry's "
         "predicted cost exceeds what is left of the team's GPU-hour budget (the body says how much is left)",
}


_MODELS: dict[int, type[BaseModel]] = {422: ValidationErrorOut, 429: LimitErrorOut}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can return (422 has the field-list body, 429 the
    budget's figures when the budget refused)."""
    return {code: {"model": _MODELS.get(code, ErrorOut), "description": _DESCRIPTIONS[code]} for code in codes}


# Routes that read a JSON body can also answer these before any handler runs.
BODY_ERRORS = (400, 413, 422)


# ----------------------------------------------------------------------------------------------------
# 422: always valid JSON
# ----------------------------------------------------------------------------------------------------


def json_echo(value: Any) -> Any:
    """A client's input made safe to echo in strict JSON: non-finite floats become their JSON5 spelling
    ("NaN", "Infinity"), anything else that JSON has no type for becomes its str()."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("NaN" if value != value else
                                                   ("Infinity" if value > 0 else "-Infinity"))
    if isinstance(value, dict):
        return {str(k): json_echo(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_echo(v) for v in value]
    return str(value)


def _query_names(dependant) -> frozenset[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


def reject_unknown_query(request: Request) -> None:
    """A route that takes query parameters refuses ones it does not know, as bodies refuse unknown fields:
    `?competiton=x` (a typo) would otherwise be ignored and answer as if no filter had been asked for."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    known = _query_names(dependant)
    if not known:  # takes no query at all: nothing a typo could be mistaken for
        return
    unknown = [k for k in request.query_params if k not in known]
    if unknown:
        raise RequestValidationError([
            {"type": "extra_forbidden", "loc": ("query", k), "msg": f"unknown query parameter; this route takes "
             f"{', '.join(sorted(known))}", "input": request.query_params.get(k)} for k in unknown])


async def validation_error_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():
        out = {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
               "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", "value_error"))}
        if "input" in e:
            out["input"] = json_echo(e["input"])
        if e.get("ctx"):
            out["ctx"] = json_echo(e["ctx"])
        errors.append(out)
    return JSONResponse({"detail": errors}, status_code=422)


# ----------------------------------------------------------------------------------------------------
# Domain errors -> statuses
# ----------------------------------------------------------------------------------------------------

STATUS_OF: dict[type[DomainError], int] = {
    NotFound: 404,
    Conflict: 409,
    Unauthorized: 401,
    Forbidden: 403,
    QuotaExceeded: 429,
    RateLimited: 429,
    BudgetExceeded: 429,
    OutsideSearchSpace: 422,
    InvalidField: 422,
}


async def domain_error_handler(_request: Request, exc: DomainError) -> JSONResponse:
    status = next((STATUS_OF[k] for k in type(exc).__mro__ if k in STATUS_OF), None)
    if status is None:  # a DomainError nobody mapped is a bug: let it be a 500, not a guess
        raise exc
    if isinstance(exc, OutsideSearchSpace):
        return JSONResponse({"detail": [_field_error(v) for v in exc.violations]}, status_code=status)
    if isinstance(exc, InvalidField):
        return JSONResponse({"detail": [{"loc": ["body", exc.field], "msg": exc.detail, "type": "unknown_value",
                                         "input": json_echo(exc.value), "ctx": {"allowed": list(exc.allowed)}}]},
                            status_code=status)
    headers = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, QuotaExceeded | RateLimited) and exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    body: dict[str, Any] = {"detail": exc.detail}
    if isinstance(exc, BudgetExceeded):  # no Retry-After: waiting frees budget only if running runs end cheaper
        body.update(exc.figures)
    return JSONResponse(body, status_code=status, headers=headers or None)


def _field_error(v: Violation) -> dict[str, Any]:
    """A violation in the shape of a FastAPI validation error, located at the submitted config's field."""
    return {"loc": ["body", "config", v.field], "msg": v.message, "type": "outside_search_space",
            "input": json_echo(v.value), "ctx": json_echo({"allowed": v.allowed})}


# ----------------------------------------------------------------------------------------------------
# Request-size limit, before anything is parsed
# ----------------------------------------------------------------------------------------------------


class _TooLarge(StarletteHTTPException):
    """Raised from `receive`: an HTTPException, so the route's body reader passes it on (FastAPI turns any
    other error while reading a body into a 400) and the exception middleware answers 413."""


class BodySizeLimit:
    """Refuse a request body over `max_bytes` with 413: at once when Content-Length says so, or as soon
    as a streamed (chunked) body crosses the limit. Nothing over the limit is buffered or parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(send, 400, "Content-Length is not a number")
                return
            if size > self.max_bytes:
                await _send_error(send, 413, self._message())
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(413, self._message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, self._message())

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes"


async def _send_error(send: Send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
