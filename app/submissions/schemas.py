from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from worker.engine.config import TrainConfig


class SubmissionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    config: TrainConfig


class EpochOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float | None
    test_accuracy: float | None
    lr: float | None
    images_per_sec: float | None
    seconds: float | None


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    seed: int
    status: str
    attempts: int
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    worker_hostname: str | None
    device_name: str | None
    accuracy: float | None
    gpu_seconds: float | None
    wall_seconds: float | None
    stop_reason: str | None
    diverged_epoch: int | None
    diverged_step: int | None
    error: str | None


class RunDetail(RunOut):
    epochs: list[EpochOut] = []
    result: dict[str, Any] | None = None


class SubmissionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    competition_id: int
    team_id: int
    user_id: int
    status: str
    accuracy: float | None
    gpu_seconds: float | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    config: dict[str, Any]


class SubmissionDetail(SubmissionOut):
    runs: list[RunDetail]
