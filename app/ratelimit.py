"""Rate limits on the two doors a script can hammer, submitting and joining: per bearer token and per
client address, answered 429 with Retry-After.

Counted in the database (`RateWindow`, fixed windows), so every API process and node shares one count.
Each count is its own short transaction on its own connection: a busy key never holds the request's
transaction, and a request that later fails (a 422, say) still counts, as it cost the server the same.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import delete

from app.admin.models import RateWindow
from app.config import get_settings
from app.db import get_engine, upsert_insert
from app.errors import RateLimited


def hit(key: str, limit: int, window_seconds: int, now: float | None = None) -> None:
    """Count one request against `key`; raise RateLimited when it is over `limit` in this window."""
    now = time.time() if now is None else now
    window = int(now // window_seconds)
    engine = get_engine(get_settings().database_url)
    upsert = upsert_insert(engine, RateWindow).values(key=key, window=window, hits=1)
    upsert = upsert.on_conflict_do_update(index_elements=["key", "window"],
                                          set_={"hits": RateWindow.hits + 1}).returning(RateWindow.hits)
    with engine.begin() as conn:
        hits = conn.execute(upsert).scalar_one()
        if hits == 1:  # this key's first request of a new window: its older windows are over
            conn.execute(delete(RateWindow).where(RateWindow.key == key, RateWindow.window < window))
    if hits > limit:
        retry_after = max(1, int((window + 1) * window_seconds - now + 0.999))
        raise RateLimited(f"rate limit: at most {limit} requests per {window_seconds} s {key.split(':')[1]}; "
                          f"retry in {retry_after} s", retry_after)


def _limit(door: str):
    def check(request: Request) -> None:
        s = get_settings()
        if not s.rate_limit_enabled:
            return
        address = request.client.host if request.client else "unknown"
        hit(f"{door}:per address:{address}", s.rate_limit_per_address, s.rate_limit_window_seconds)
        auth = request.headers.get("authorization", "")
        if auth:  # the token's hash: counted before (and whether or not) it identifies anyone
            digest = hashlib.sha256(auth.encode()).hexdigest()[:32]
            hit(f"{door}:per token:{digest}", s.rate_limit_per_token, s.rate_limit_window_seconds)

    return check


SubmitLimit = Annotated[None, Depends(_limit("submit"))]
JoinLimit = Annotated[None, Depends(_limit("join"))]
