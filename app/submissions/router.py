from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response, status

from app import costs, eta
from app.auth.dependencies import CurrentUser, SessionDep
from app.competitions.service import get_competition, membership
from app.http import BODY_ERRORS, error_responses
from app.ratelimit import SubmitLimit
from app.submissions import ensembles, service, views
from app.submissions.schemas import (
    BudgetOut,
    EnsembleCreate,
    SubmissionCreate,
    SubmissionDetail,
    SubmissionOut,
)

router = APIRouter(prefix="/api", tags=["submissions"])
SubmissionId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.post("/competitions/{slug}/submissions", response_model=SubmissionOut,
             status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, 404, 409, 429, *BODY_ERRORS))
def submit(slug: str, data: SubmissionCreate, _: SubmitLimit, session: SessionDep, user: CurrentUser,
           response: Response,
           idempotency_key: Annotated[str | None, Header(
               min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
               description="Any unique string per intended submission (a UUID): a retry with the same key "
                           "returns the first submission instead of making and charging a second one.")] = None):
    comp = get_competition(session, slug)
    member = membership(session, comp, user)
    sub, created = service.create_submission(session, comp, member, user, data.config, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return views.summary(session, sub)


@router.post("/competitions/{slug}/ensembles", response_model=SubmissionOut, status_code=status.HTTP_201_CREATED,
             responses=error_responses(401, 403, 404, 409, 429, *BODY_ERRORS))
def submit_ensemble(slug: str, data: EnsembleCreate, _: SubmitLimit, session: SessionDep, user: CurrentUser):
    """An ensemble entry of 2 to 5 of your team's succeeded submissions, scored at once from their stored test
    logits (softmax probabilities averaged, matched seed by seed): no training, no GPU-hours. It counts
    against the submission quota and ranks on the board like any entry."""
    comp = get_competition(session, slug)
    member = membership(session, comp, user)
    return views.summary(session, ensembles.create_ensemble(session, comp, member, user, data.members))


@router.get("/competitions/{slug}/budget", response_model=BudgetOut, responses=error_responses(401, 403, 404))
def team_budget(slug: str, session: SessionDep, user: CurrentUser):
    """The caller's team's GPU-hour budget in this competition: spent, reserved by unfinished runs, left."""
    comp = get_competition(session, slug)
    member = membership(session, comp, user)
    return costs.budget_view(session, comp, member.team_id)


@router.get("/submissions", response_model=list[SubmissionOut], responses=error_responses(401, 404, 422))
def my_submissions(session: SessionDep, user: CurrentUser, competition: str | None = None):
    comp_id = get_competition(session, competition).id if competition else None
    subs = service.list_own(session, user, comp_id)
    extra = eta.annotate_many(session, subs)
    return [SubmissionOut.model_validate(s).model_copy(update=extra[s.id]) for s in subs]


@router.get("/submissions/{submission_id}", response_model=SubmissionDetail,
            responses=error_responses(401, 404, 422))
def get_submission(submission_id: SubmissionId, session: SessionDep, user: CurrentUser):
    """Its team's, and readable by its competition's organizer and admins; anyone else gets a 404."""
    return views.detail(session, service.get_visible_submission(session, user, submission_id))


@router.post("/submissions/{submission_id}/cancel", response_model=SubmissionDetail,
             responses=error_responses(401, 404, 409, 422))
def cancel_submission(submission_id: SubmissionId, session: SessionDep, user: CurrentUser):
    sub = service.get_own_submission(session, user, submission_id)
    return views.detail(session, service.cancel(session, sub))
