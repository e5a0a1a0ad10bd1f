"""The FastAPI app. `uvicorn app.main:app` (schema is created/upgraded by `hparena migrate`)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import IntegrityError

from app.admin.router import router as admin_router
from app.auth.router import router as auth_router
from app.auth.service import ensure_admin
from app.competitions.router import router as competitions_router
from app.config import get_settings
from app.db import session_scope
from app.errors import DomainError
from app.http import BodySizeLimit, domain_error_handler, reject_unknown_query, validation_error_handler
from app.leaderboard.router import router as leaderboard_router
from app.metrics import mount as mount_metrics
from app.pages import mount as mount_pages
from app.submissions.rescore_router import router as rescore_router
from app.submissions.router import router as submissions_router


@asynccontextmanager
async def lifespan(_app: FastAPI):
    settings = get_settings()  # validated at start-up
    secret = settings.admin_secret()  # production refuses the default admin token
    try:
        with session_scope() as s:
            ensure_admin(s, secret)
    except IntegrityError:  # another API process (uvicorn --workers N) bootstrapped it at the same moment
        pass
    yield


def create_app() -> FastAPI:
    app = FastAPI(title="hparena", version="0.1.0", lifespan=lifespan, dependencies=[Depends(reject_unknown_query)],
                  description="Hyperparameter-tuning competitions: submit a config, a GPU worker trains it, "
                              "the leaderboard ranks it.")
    for r in (competitions_router, submissions_router, leaderboard_router, rescore_router, auth_router,
              admin_router):
        app.include_router(r)
    mount_pages(app)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(DomainError, domain_error_handler)
    app.add_middleware(BodySizeLimit, max_bytes=get_settings().max_body_bytes)
    mount_metrics(app)  # after the other middleware: it times what they answer too (a 413)

    @app.get("/api/health", tags=["meta"])
    def health() -> dict:
        return {"status": "ok"}

    return app


app = create_app()
