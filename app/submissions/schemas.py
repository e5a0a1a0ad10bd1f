from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from app.submissions.ensembles import MAX_MEMBERS, MIN_MEMBERS
from worker.engine.config import TrainConfig


class SubmissionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    config: TrainConfig


class EnsembleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    members: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(
        min_length=MIN_MEMBERS, max_length=MAX_MEMBERS,
        description=f"{MIN_MEMBERS} to {MAX_MEMBERS} distinct ids of your team's succeeded, trained submissions "
                    "in this competition. The ensemble averages their softmax probabilities from their stored "
                    "test logits, matching their runs seed by seed; nothing is trained.")

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[int]) -> list[int]:
        twice = sorted({i for i in members if members.count(i) > 1})
        if twice:
            raise ValueError(f"members must be distinct; named more than once: {', '.join(map(str, twice))}")
        return members


GPU_SECONDS = ("Device-seconds, measured the same way on every worker: the wall time of the training and "
               "evaluation phases (every epoch, the per-epoch and the final evaluation), with the device "
               "synchronised at each phase's end; setup (building the model, moving data) is not counted. "
               "On a CPU hardware class the figure is CPU-seconds: see cost_unit.")
FAILURE_KIND = ("Why it failed, when it did: infrastructure (worker lost, node fault, services unreachable, process "
                "killed by the system; retried automatically and refunded), config (diverged, out of memory even at "
                "micro-batch 1, invalid at run time; charged) or timeout (ran past its time limit; charged).")
CHARGED = ("Device-seconds charged to the team's GPU-hour budget: what it measured, or 0 when refunded (an "
           "infrastructure failure), reused, or run for an organizer's rescore. Null while not over.")


def _relative_error(actual: float | None, predicted: float | None) -> float | None:
    if actual is None or not predicted:
        return None
    return (actual - predicted) / predicted


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
    precision: str | None = Field(None, description=(
        "The numeric precision it trains in (bf16, fp16 or fp32; what `precision: auto` resolved to), reported "
        "by the worker once the model is set up, before the first step; the result's precision once over. "
        "Null until reported."))
    setup_seconds: float | None = Field(None, description=(
        "Wall seconds its current attempt spent on setup (building the model and optimizer, moving the data "
        "to the device), reported before the first step; not counted in gpu_seconds. Null until reported."))
    round: int = Field(0, description="0: one of the submission's own runs; r: added by the organizer's "
                                      "rescore r with a fresh seed (charged nothing to the team).")
    accuracy: float | None
    ece: float | None = Field(None, description="Expected calibration error on the public half.")
    gpu_seconds: float | None
    wall_seconds: float | None
    stop_reason: str | None
    diverged_epoch: int | None
    diverged_step: int | None
    error: str | None
    failure_kind: str | None = Field(description=FAILURE_KIND)
    predicted_seconds: float | None = Field(description="Device-seconds predicted at submission (see gpu_seconds).")
    charged_seconds: float | None = Field(description=CHARGED)
    reused_from_run_id: int | None = Field(description=(
        "Set when this run trained nothing (dedup): its result, curve and accuracy are those of that earlier "
        "run of the competition, whose resolved spec (config, data, model, budget, seed) is identical. Its "
        "gpu_seconds is the original's measured figure, describing the result; it cost the team nothing "
        "(charged_seconds 0, attempts 0), and its submission still counts toward the quota."))
    device_mismatch: str | None = Field(description="Why the device it ran on is not its competition's "
                                                    "hardware class (null: it is). The board flags such results.")

    @computed_field(description="(gpu_seconds - predicted_seconds) / predicted_seconds, once both are known.")
    @property
    def prediction_error(self) -> float | None:
        return _relative_error(self.gpu_seconds, self.predicted_seconds)


class RunDetail(RunOut):
    epochs: list[EpochOut] = []
    train_seconds: float | None = Field(None, description=(
        "Seconds spent training so far (every epoch trained, including those an earlier attempt checkpointed; "
        "evaluation not counted): while it runs, the last finished epoch's `seconds`; once over, the result's "
        "timings.train_seconds. Null before the first epoch ends."))
    result: dict[str, Any] | None = None


class SubmissionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    competition_id: int
    team_id: int
    user_id: int
    status: str
    accuracy: float | None = Field(description="Mean public-half accuracy over the scoring round's runs, one "
                                               "per seed (see round).")
    accuracy_std: float | None = Field(None, description="Sample standard deviation (ddof 1) of that accuracy "
                                                         "across the seeds; null with one seed.")
    ece: float | None = Field(None, description="Mean expected calibration error (public half) over the scoring "
                                                "round's runs; null when a run has none recorded.")
    round: int = Field(0, description="The scoring round its scores come from: 0, its own runs; r, the runs "
                                      "the organizer's rescore r added, once they all succeeded.")
    gpu_seconds: float | None = Field(description="Summed over the scoring round's runs. " + GPU_SECONDS)
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    config: dict[str, Any]
    kind: str = Field("train", description="train: its runs train; ensemble: scored from its members' stored "
                                           "logits, no training (config is then {\"ensemble_of\": members}).")
    members: list[int] | None = Field(None, description="An ensemble's member submissions, in the order given.")
    final: bool = Field(False, description="Marked final by its team (PUT /api/competitions/{slug}/final-entries).")
    is_baseline: bool = Field(False, description="An organizer's baseline: an unranked reference line on the boards.")
    failure_kind: str | None = Field(description=FAILURE_KIND)
    predicted_seconds: float | None = Field(description="Device-seconds predicted at submission, all seeds: "
                                                        "epochs x training images x seeds / the class's measured "
                                                        "throughput, plus evaluation. Reused runs cost nothing.")
    charged_seconds: float | None = Field(description=CHARGED)
    device_mismatch: bool = Field(description="A run of it ran on a device that is not its competition's class.")
    cost_unit: str = Field("gpu-seconds", description="gpu-seconds, or cpu-seconds on a CPU hardware class.")
    queue_position: int | None = Field(None, description="While queued: runs of its class that go before its "
                                                         "first queued run (0: next), in fair-share order.")
    eta_seconds: float | None = Field(None, description="While queued or running: predicted seconds until it "
                                                        "finishes, from its queue position and the class's live "
                                                        "workers (null: no live worker serves its class).")
    eta_at: datetime | None = Field(None, description="now + eta_seconds.")
    eta_note: str | None = Field(None, description="How the ETA was reached, or why there is none.")

    @computed_field(description="predicted_seconds / 3600.")
    @property
    def predicted_gpu_hours(self) -> float | None:
        return None if self.predicted_seconds is None else self.predicted_seconds / 3600

    @computed_field(description="(gpu_seconds - predicted_seconds) / predicted_seconds, once it is over.")
    @property
    def prediction_error(self) -> float | None:
        return _relative_error(self.gpu_seconds, self.predicted_seconds)


class SubmissionDetail(SubmissionOut):
    runs: list[RunDetail]
    failure_reason: str | None = Field(None, description=(
        "Why it did not succeed, in plain words: whose fault (failure_kind), what happened (the failing run's "
        "error) and what it cost the team; for a cancelled one, who cancelled it. Null while it is queued or "
        "running, and once it succeeded."))


class BudgetOut(BaseModel):
    """A team's GPU-hour budget in one competition, as its members see it (device-seconds: see GPU_SECONDS)."""

    team_id: int
    budget_gpu_hours: float | None = Field(description="The competition's per-team budget; null: unlimited.")
    budget_seconds: float | None
    spent_seconds: float = Field(description="Charged for the team's runs that are over (see charged_seconds).")
    reserved_seconds: float = Field(description="Predicted for its queued and running runs: held until they end "
                                                "and are charged what they measured.")
    remaining_seconds: float | None = Field(description="budget - spent - reserved (never below 0); null: "
                                                        "unlimited. An entry predicted to cost more is refused "
                                                        "with 429.")
    remaining_gpu_hours: float | None
    cost_unit: str = Field(description="gpu-seconds, or cpu-seconds on a CPU hardware class.")
    runs_charged: int = Field(description="The team's runs counted in spent_seconds (reused and refunded ones "
                                          "count with 0).")
    runs_unfinished: int = Field(description="Its queued and running runs, counted in reserved_seconds.")
