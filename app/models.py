"""Every table, imported in one place so Alembic's autogenerate and `Base.metadata` see them all."""

from app.admin.models import Deployment, HardwareClass, RateWindow, Throughput, WorkerNode
from app.audit.models import AuditEvent
from app.auth.models import Role, User
from app.competitions.models import Competition, Membership, Team
from app.db import Base
from app.leaderboard.models import BoardCache, TeamBest
from app.submissions.models import EpochMetric, Rescore, Run, RunLogits, RunStatus, Submission, TestLabels

__all__ = [
    "AuditEvent", "Base", "BoardCache", "Competition", "Deployment", "EpochMetric", "HardwareClass", "Membership",
    "RateWindow", "Rescore", "Role", "Run", "RunLogits", "RunStatus", "Submission", "Team", "TeamBest", "TestLabels",
    "Throughput", "User", "WorkerNode",
]
