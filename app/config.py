"""One settings object, read from HPARENA_* environment variables (and a .env file if present)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The offline copy of CIFAR-10 that sits beside the checkout on the project's machines.
SHARED_CIFAR10 = PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
DEFAULT_ADMIN_TOKEN = "change-me-admin-token"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HPARENA_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"
    var_dir: Path = PROJECT_ROOT / "var"

    # SQLite file by default; PostgreSQL in production: postgresql+psycopg://user@host/db
    database_url: str = ""
    # Embedded broker by default (kombu's filesystem transport, no server). Production: redis://host:6379/0
    broker_url: str = "filesystem://"

    # Where packed datasets and torchvision downloads go, and an explicit dataset location if any.
    data_dir: Path | None = None
    dataset_path: Path | None = None
    allow_download: bool = True
    # "auto" picks cuda when present; a worker may be pinned to "cpu" or "cuda:1".
    device: str = "auto"
    # Each running run saves its state here after an epoch (see checkpoint_seconds); a retried attempt
    # (its worker was lost) resumes from it. Workers on several nodes need it on storage they share (compose: a volume).
    checkpoint_dir: Path | None = None
    # At most one checkpoint per this many seconds (a full-width ResNet18's state is ~180 MB to write); the
    # last epoch is always saved. A lost worker costs at most this much training, plus one epoch.
    checkpoint_seconds: float = 60.0

    # Request bodies over this many bytes are refused with 413 before they are read (the largest real
    # body, a competition with a full search space, is a few KiB).
    max_body_bytes: int = 64 * 1024

    # Submissions and joins per window, per bearer token and per client address (429 + Retry-After above).
    # Behind a reverse proxy every client has the proxy's address: raise per_address, or run uvicorn with
    # --proxy-headers so the client's own address is used.
    rate_limit_enabled: bool = True
    rate_limit_window_seconds: int = 60
    rate_limit_per_token: int = 30
    rate_limit_per_address: int = 120

    # A bootstrap admin, so a fresh install can create organizers. The API refuses the default in production
    # (admin_secret); only the API needs it.
    admin_token: str = DEFAULT_ADMIN_TOKEN

    # Worker behaviour.
    hardware_class: str = "cpu"  # which queue this worker consumes: train.<hardware_class>
    heartbeat_seconds: float = 5.0
    # How often each worker's parent looks for competitions whose cached boards are stale (a result landed, a
    # final mark, a rule) and recomputes them (app.leaderboard.board.refresh_stale).
    board_refresh_seconds: float = Field(2.0, gt=0, le=3600)
    # A stale board younger than this is served as it is (marked stale) while the workers refresh it; an older
    # one, which no worker refreshed (none running), is refreshed by the request that finds it. 0: always.
    board_stale_grace_seconds: float = Field(15.0, ge=0, le=86400)
    # A running run whose heartbeat is older than this is presumed dead; its redelivered message may retake it.
    stale_after_seconds: float = 60.0
    max_attempts: int = 3
    # How often each worker's parent process reports to the fleet table and sweeps for stale runs.
    sweep_seconds: float = 15.0
    # A worker that refuses another deployment's message waits this long before it goes back to the queue.
    refuse_delay_seconds: float = 5.0
    task_events: bool = Field(False, description=(
        "Celery task events, for Flower's Tasks tab: each worker announces every task it receives, starts and "
        "ends (task-received, task-started, task-succeeded or task-failed, with the runtime), and whatever "
        "sends a task (the API, a worker's reconciler) announces it as task-sent. A few small messages per task, "
        "Redis pub/sub messages that vanish when nothing listens. Set it on the API and on every worker. "
        "Refused on the embedded filesystem broker, which keeps a monitor's event queue after the monitor has "
        "gone (docs/operations.md, \"Flower\")."))
    # Redis redelivers unacked messages after this; it must exceed the longest training budget.
    visibility_timeout_seconds: int = 12 * 3600
    # Torch threads a worker trains with: its share of the node (app.hardware.thread_share). 0: the cores
    # this process may run on (its CPU affinity, e.g. a container's cpuset), capped by its cgroup CPU quota.
    # N workers on one node: give each its own cores (cpuset), or set this to cores / N.
    worker_threads: int = Field(0, ge=0, le=1024)
    # How long a worker's start-up device probe (python -m worker.probe) may take.
    probe_timeout_seconds: float = 120.0

    # Time limits (app.submissions.limits). A run may take time_limit_factor times its predicted device-seconds
    # (never less than the floor, which also covers set-up: packing the dataset, building the model), capped
    # by its budget's max_seconds plus an evaluation allowance (that share of max_seconds) plus the floor,
    # and by time_limit_max_seconds. Past its soft limit the run is stopped and ends as `timeout`; if it is
    # still not over grace seconds later (stuck in native code), its process is killed and replaced.
    time_limit_factor: float = 3.0
    time_limit_floor_seconds: float = 300.0
    time_limit_eval_share: float = 0.5
    time_limit_grace_seconds: float = 60.0
    # The longest soft limit any run gets, and the limit of a run with neither a prediction nor max_seconds.
    # Celery's own hard limit (app.queue) sits above it plus grace, below the visibility timeout.
    time_limit_max_seconds: float = 10 * 3600

    @model_validator(mode="after")
    def _defaults_and_production_guard(self) -> Settings:
        self.var_dir = Path(self.var_dir)
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'hparena.db'}"
        if self.data_dir is None:
            self.data_dir = self.var_dir / "data"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.var_dir / "checkpoints"
        if self.dataset_path is None and SHARED_CIFAR10.exists():
            self.dataset_path = SHARED_CIFAR10
        if self.environment == "production":
            if self.database_url.startswith("sqlite"):
                raise ValueError("production needs a server database (HPARENA_DATABASE_URL=postgresql+psycopg://...)")
        if self.task_events and self.broker_url.startswith("filesystem"):
            raise ValueError("HPARENA_TASK_EVENTS is refused on the embedded filesystem broker: kombu's filesystem "
                             "transport keeps a monitor's event queue after the monitor has gone, so every later "
                             "event is left as a file in the broker's queue folder, which each worker lists on "
                             "every poll. Monitor tasks on a Redis broker (HPARENA_BROKER_URL=redis://...)")
        if self.visibility_timeout_seconds <= self.task_time_limit_seconds:
            raise ValueError("HPARENA_VISIBILITY_TIMEOUT_SECONDS must exceed the longest a run may take "
                             f"({self.task_time_limit_seconds:g} s: HPARENA_TIME_LIMIT_MAX_SECONDS plus twice "
                             "the grace), or Redis hands a running run to a second worker")
        return self

    def admin_secret(self) -> str:
        """The bootstrap admin's token, for the API that keys the admin to it. Production refuses the default
        or a short one here, not at load: workers and migrations never use it, so their nodes need not hold it."""
        if self.environment == "production" and (self.admin_token == DEFAULT_ADMIN_TOKEN or len(self.admin_token) < 24):
            raise ValueError("HPARENA_ADMIN_TOKEN must be set to a long random secret in production")
        return self.admin_token

    @property
    def task_time_limit_seconds(self) -> float:
        """Celery's hard limit for any task in the worker (app.queue): a backstop above every run's own."""
        return self.time_limit_max_seconds + 2 * self.time_limit_grace_seconds

    @property
    def broker_dir(self) -> Path:
        return self.var_dir / "broker"

    def queue_for(self, hardware_class: str) -> str:
        return f"train.{hardware_class}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
