"""Test data builders. API-level helpers go through HTTP; model factories build rows for ranking tests."""

from __future__ import annotations

import itertools
from datetime import timedelta

import factory
from factory.alchemy import SQLAlchemyModelFactory
from sqlalchemy import update

from app.auth.models import Role, User
from app.auth.service import hash_token
from app.competitions.models import Competition, Membership, Team
from app.db import utcnow
from app.names import name_key
from app.submissions.models import Run, RunStatus, Submission
from app.submissions.service import refresh_submission, run_spec
from worker.engine.config import TrainConfig

_n = itertools.count(1)


def competition_payload(**overrides) -> dict:
    """A tiny, fast competition on the small real-CIFAR tarball (set dataset.path)."""
    n = next(_n)
    payload = {
        "slug": f"comp-{n}",
        "title": f"Competition {n}",
        "dataset": {"name": "cifar10", "image_size": 32},
        "model": {"arch": "resnet18", "width": 8},
        "budget": {"max_epochs": 3},
        "hardware_class": "cpu",
        "search_space": {"lr": {"min": 0.001, "max": 1.0}, "batch_size": {"choices": [32, 64, 100]}},
        "seeds": [0],
    }
    payload.update(overrides)
    return payload


def make_organizer(client, admin_headers, name="prof") -> dict[str, str]:
    r = client.post("/api/admin/users", json={"name": name, "role": "organizer"}, headers=admin_headers)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def make_competition(client, organizer_headers, **overrides) -> dict:
    r = client.post("/api/competitions", json=competition_payload(**overrides), headers=organizer_headers)
    assert r.status_code == 201, r.text
    return r.json()


def join(client, slug, name="alice", team=None, invite_code=None) -> dict[str, str]:
    body = {"name": name, "team": team or f"team-{name}", "invite_code": invite_code}
    r = client.post(f"/api/competitions/{slug}/join", json=body)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}", "X-Invite-Code": r.json()["invite_code"]}


def submit(client, comp: dict, headers: dict[str, str], expect: int = 201, **config) -> dict:
    """POST a submission of `config` to competition `comp`; asserts the status and returns the body."""
    r = client.post(f"/api/competitions/{comp['slug']}/submissions", json={"config": config}, headers=headers)
    assert r.status_code == expect, r.text
    return r.json()


def cpu_class(database_url: str, name: str, **overrides) -> None:
    """A hardware class any CPU serves, under a name of the test's own (a queue no other test shares)."""
    from sqlalchemy.orm import Session

    from app.admin.models import HardwareClass
    from app.db import get_engine

    values = {"device_type": "cpu", "name_pattern": "", "train_images_per_sec": 400.0,
              "eval_images_per_sec": 1500.0, "description": "test class", "updated_at": utcnow(), **overrides}
    with Session(get_engine(database_url)) as s:
        s.merge(HardwareClass(name=name, **values))
        s.commit()


# ---- model factories (set `_meta.sqlalchemy_session` via `bind(session)`) -------------------------------


class _Base(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_persistence = "commit"


class UserFactory(_Base):
    class Meta:
        model = User

    name = factory.Sequence(lambda n: f"user{n}")
    role = Role.participant
    token_hash = factory.Sequence(lambda n: hash_token(f"token-{n}"))


class CompetitionFactory(_Base):
    class Meta:
        model = Competition

    slug = factory.Sequence(lambda n: f"fcomp-{n}")
    title = "Factory competition"
    dataset = factory.LazyFunction(lambda: {"name": "cifar10"})
    model = factory.LazyFunction(lambda: {"arch": "resnet18", "width": 8})
    budget = factory.LazyFunction(lambda: {"max_epochs": 3})
    hardware_class = "cpu"
    search_space = factory.LazyFunction(dict)
    seeds = factory.LazyFunction(lambda: [0])


class TeamFactory(_Base):
    class Meta:
        model = Team

    competition = factory.SubFactory(CompetitionFactory)
    competition_id = factory.SelfAttribute("competition.id")
    name = factory.Sequence(lambda n: f"team{n}")
    name_key = factory.LazyAttribute(lambda o: name_key(o.name))
    invite_code = factory.Sequence(lambda n: f"code{n}")

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        kwargs.pop("competition", None)
        return super()._create(model_class, *args, **kwargs)


class MembershipFactory(_Base):
    class Meta:
        model = Membership


class SubmissionFactory(_Base):
    """A finished submission with its run, for ranking tests: pass accuracy/gpu_seconds/status. Its state is
    then derived by refresh_submission, as a worker's finish derives it, so the leaderboard's table follows."""

    class Meta:
        model = Submission

    config = factory.LazyFunction(dict)
    status = RunStatus.succeeded
    created_at = factory.Sequence(lambda n: utcnow() - timedelta(hours=1) + timedelta(seconds=n))

    @factory.post_generation
    def with_run(obj, create, extracted, **kwargs):
        session = SubmissionFactory._meta.sqlalchemy_session
        spec = run_spec(session.get(Competition, obj.competition_id), TrainConfig.model_validate(obj.config), 0)
        run = Run(submission_id=obj.id, seed=0, spec=spec, spec_hash=spec.identity(), queue="train.cpu",
                  status=obj.status, attempts=1, accuracy=obj.accuracy, gpu_seconds=obj.gpu_seconds)
        session.add(run)
        session.execute(update(Team).where(Team.id == obj.team_id).values(submissions=Team.submissions + 1))
        refresh_submission(session, obj.id)
        session.commit()


def bind(session) -> None:
    for f in (UserFactory, CompetitionFactory, TeamFactory, MembershipFactory, SubmissionFactory):
        f._meta.sqlalchemy_session = session


def team_member(comp: Competition, name: str | None = None) -> tuple[Team, User]:
    """A team in `comp` (named `name`, or the factory's next name) and a user who is its one member."""
    team = TeamFactory(competition=comp, **({"name": name} if name else {}))
    user = UserFactory()
    MembershipFactory(user_id=user.id, team_id=team.id, competition_id=comp.id)
    return team, user


# ---- results landed the way a worker lands them, with planted per-image outcomes ------------------------

_config_n = itertools.count(1)


def planted_logits(correct, labels, classes: int = 10):
    """fp16 logits whose argmax is the label where `correct` is true and the next class where it is false."""
    import torch

    labels = torch.as_tensor(labels, dtype=torch.long)
    hit = torch.as_tensor(correct, dtype=torch.bool)
    pred = torch.where(hit, labels, (labels + 1) % classes)
    return (torch.nn.functional.one_hot(pred, classes).float() * 4.0).half()


def finish_runs(submission_id: int, per_seed: list[dict], *, round: int = 0) -> None:
    """Claim and finish each run of `submission_id` (in seed order, of scoring round `round`) as a worker would,
    with per_seed[i] = finish's fields for the i-th run: accuracy, private_accuracy, gpu_seconds, and
    `correct` (a bool sequence over the test set, with `labels`) turned into planted logits."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.submissions import runs as run_service

    with session_scope() as s:
        run_ids = list(s.scalars(select(Run.id).where(Run.submission_id == submission_id, Run.round == round)
                                 .order_by(Run.seed)))
    assert len(run_ids) == len(per_seed), (run_ids, per_seed)
    for run_id, fields in zip(run_ids, per_seed, strict=True):
        fields = dict(fields)
        status = fields.pop("status", RunStatus.succeeded)
        if "correct" in fields:
            correct, labels = fields.pop("correct"), fields.pop("labels")
            fields.update(logits=planted_logits(correct, labels), labels=_tensor(labels))
        fields.setdefault("gpu_seconds", 100.0)
        with session_scope() as s:
            claimed = run_service.claim(s, run_id, "test-worker", stale_after=60, max_attempts=3)
        with session_scope() as s:
            assert run_service.finish(s, claimed, status, **fields) is None


def _tensor(values):
    import torch

    return torch.as_tensor(values, dtype=torch.long)


def land(client, comp: dict, headers: dict[str, str], per_seed: list[dict] | dict, **config) -> int:
    """Submit a config of its own (an identical one would reuse an earlier result) over HTTP, then finish its
    runs with `per_seed` (one dict per seed, or one dict for every seed; see finish_runs). -> submission id."""
    config = {"lr": 0.05 + next(_config_n) / 10000, "batch_size": 32, **config}
    sub = submit(client, comp, headers, **config)
    seeds = len(comp.get("seeds", [0]))
    finish_runs(sub["id"], per_seed if isinstance(per_seed, list) else [per_seed] * seeds)
    return sub["id"]
