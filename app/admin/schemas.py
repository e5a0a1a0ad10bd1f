from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.auth.models import Role
from app.names import Name


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    role: Role = Role.organizer


class UserCreated(BaseModel):
    id: int
    name: str
    role: Role
    token: str = Field(description="Bearer token; shown only once.")


class WorkerOut(BaseModel):
    hostname: str
    queues: list[str]
    device_name: str | None
    state: Literal["busy", "idle", "offline"]
    current_run_id: int | None
    current_submission_id: int | None = Field(description="The submission of the run it is training.")
    started_at: datetime
    last_seen: datetime
    last_seen_age_seconds: float = Field(description="Seconds since its last heartbeat (last_seen).")
    problem: str | None = Field(description="Why this worker refuses work, in words (null: it doesn't). For "
                                            "example its device is not its hardware class (it then consumes "
                                            "nothing), or a message came from another deployment: the worker "
                                            "was pointed at the wrong database, or shares another "
                                            "deployment's broker.")
    hardware_class: str | None = Field(description="The class it serves (HPARENA_HARDWARE_CLASS).")
    threads: int | None = Field(description="Torch threads it trains with: its share of the node's cores "
                                            "(HPARENA_WORKER_THREADS, else its CPU affinity and cgroup quota).")


class QueueOut(BaseModel):
    queue: str
    queued_runs: int
    running_runs: int
    broker_messages: int | None = Field(description="Messages waiting in the broker (null: it can't say).")
    oldest_queued_run_id: int | None = Field(description="The queued run submitted first (null: none waits).")
    oldest_queued_at: datetime | None = Field(description="When that run was submitted.")
    oldest_queued_age_seconds: float | None = Field(description="How long it has waited, in seconds.")


class StaleRunOut(BaseModel):
    """A running run whose heartbeat is older than stale_after_seconds: its worker is presumably gone, and
    the sweeper will requeue it (or fail it after too many attempts)."""

    run_id: int
    submission_id: int
    queue: str
    worker_hostname: str | None
    attempts: int
    started_at: datetime | None
    heartbeat_at: datetime
    heartbeat_age_seconds: float


class FleetOut(BaseModel):
    workers: list[WorkerOut]
    queues: list[QueueOut]
    stale_runs: list[StaleRunOut] = Field(description="Running runs whose heartbeat is stale, stalest first.")


# ----------------------------------------------------------------------------------------------------
# Hardware classes
# ----------------------------------------------------------------------------------------------------


class HardwareClassIn(BaseModel):
    """A hardware class as an admin defines it (PUT /api/admin/hardware-classes/{name})."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    device_type: Literal["cpu", "cuda"]
    name_pattern: str = Field("", max_length=200, description=(
        "A regular expression searched, case-insensitively, in the device's name (torch's, e.g. \"NVIDIA H100 "
        "80GB HBM3\"; a CPU's is \"CPU: \" and its model name). Empty: any name."))
    min_memory_gib: float | None = Field(None, ge=0, le=1_000_000, description=(
        "Device memory range in GiB, as torch reports total_memory (an \"80GB\" H100 has 79.2 GiB). CUDA only."))
    max_memory_gib: float | None = Field(None, ge=0, le=1_000_000)
    precision: Literal["bf16", "fp16", "fp32"] | None = Field(None, description=(
        "What precision \"auto\" must resolve to on the device (null: any)."))
    cpu_capability: str | None = Field(None, min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_]+$",
                                       description="CPU classes: the ATen CPU capability the worker must run "
                                                   "with (AVX2, AVX512; a prefix match). Null: any.")
    train_images_per_sec: float = Field(gt=0, le=1e9, description=(
        "The cost prior until finished runs measure it: training images/s of a width-64 ResNet18 on "
        "32-pixel images."))
    eval_images_per_sec: float = Field(gt=0, le=1e9, description="The same for evaluation.")
    description: str = Field("", max_length=2000)

    @field_validator("name_pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> HardwareClassIn:
        if self.min_memory_gib is not None and self.max_memory_gib is not None \
                and self.min_memory_gib > self.max_memory_gib:
            raise ValueError(f"min_memory_gib ({self.min_memory_gib:g}) must not exceed max_memory_gib "
                             f"({self.max_memory_gib:g})")
        if self.device_type == "cpu":
            if self.min_memory_gib is not None or self.max_memory_gib is not None:
                raise ValueError("a memory range applies to cuda classes only (a CPU reports no device memory)")
            if self.precision == "fp16":
                raise ValueError('precision "auto" never resolves to fp16 on a CPU: use bf16, fp32 or null')
        elif self.cpu_capability is not None:
            raise ValueError("cpu_capability applies to cpu classes only")
        return self


class HardwareClassOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    device_type: str
    name_pattern: str
    min_memory_gib: float | None
    max_memory_gib: float | None
    precision: str | None
    cpu_capability: str | None
    train_images_per_sec: float
    eval_images_per_sec: float
    description: str
    updated_at: datetime
