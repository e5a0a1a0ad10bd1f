"""What crosses the engine's door: its outcome enums, the events `train()` emits, and the result it returns.

Plain data (pydantic, no torch), so the worker and the API can read a stored result with its types. The
JSON of a `TrainResult` is the run's record: the worker stores it whole, `hparena train` writes it to a
file, and both read it back with `TrainResult.model_validate`.
"""

from __future__ import annotations

import math
import types
import typing
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from worker.engine.config import RunSpec

# Marks a field computed on the private test half: participants never see it (see participant_json).
PRIVATE: dict[str, Any] = {"private": True}


def json_safe(obj: Any) -> Any:
    """NaN/inf become None (strict JSON has neither); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


class StopRequested(Exception):  # noqa: N818 - it is a request, not an error
    """Raised by an on_event callback to stop training (a cancelled submission)."""


class EngineError(RuntimeError):
    """A run that cannot proceed, with a message meant for the participant.

    `kind` says whose doing it is, which decides who pays for the run: "config" (the run's own config, as
    out of memory at micro-batch 1: charged) or "infrastructure" (the machine, as a GPU that is not there:
    retried, then refunded). The worker stores it as the run's failure kind, whose values these are."""

    def __init__(self, message: str, kind: Literal["config", "infrastructure"] = "config"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # pickled with its kind (the pool sends a child's exception to its parent)
        return type(self), (str(self), self.kind)


class Outcome(StrEnum):
    """How a training run ended, as the engine sees it (the worker adds failed and superseded)."""

    succeeded = "succeeded"
    diverged = "diverged"
    cancelled = "cancelled"


class StopReason(StrEnum):
    completed = "completed"  # every planned epoch ran
    time_budget = "time_budget"  # the budget's max_seconds ran out; the result still counts
    diverged = "diverged"  # the loss became NaN or infinite
    cancelled = "cancelled"  # the callback raised StopRequested

    @property
    def outcome(self) -> Outcome:
        return {StopReason.diverged: Outcome.diverged, StopReason.cancelled: Outcome.cancelled}.get(
            self, Outcome.succeeded)


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------------
# Events: what on_event receives while training runs
# ----------------------------------------------------------------------------------------------------


class SetupEvent(_Data):
    """Once, when the model, optimizer and data are on the device and the first step is next."""

    kind: Literal["setup"] = "setup"
    device: str
    precision: str
    total_steps: int
    epochs: int
    steps_per_epoch: int
    setup_seconds: float


class ProgressEvent(_Data):
    """About ten times an epoch: the last step's loss and the rate so far."""

    kind: Literal["progress"] = "progress"
    epoch: int
    step: int
    total_steps: int
    loss: float
    lr: float
    images_per_sec: float

    @property
    def fraction(self) -> float:
        return self.step / max(self.total_steps, 1)


class EpochRow(_Data):
    """One epoch's line of the history (an epoch cut short by the time budget is marked partial)."""

    epoch: int
    epochs: int
    train_loss: float | None
    steps: int
    partial: bool
    lr: float
    seconds: float  # training seconds so far, all epochs
    images_per_sec: float
    test_accuracy: float | None  # the public half, when spec.eval_every_epoch


class EpochEvent(EpochRow):
    """After every epoch, including a partial last one."""

    kind: Literal["epoch"] = "epoch"

    @property
    def fraction(self) -> float:
        return self.epoch / self.epochs

    def row(self) -> EpochRow:
        return EpochRow.model_validate(self.model_dump(exclude={"kind"}))


class ResumeEvent(_Data):
    """Right after setup, when a checkpoint was restored: training goes on after `epochs_done` epochs, and
    `history` holds their rows (a caller that shows the curve shows them again)."""

    kind: Literal["resume"] = "resume"
    epochs_done: int
    steps_done: int
    history: list[EpochRow]


class OomEvent(_Data):
    """A step ran out of device memory; it is redone with the micro-batch halved to this size."""

    kind: Literal["oom"] = "oom"
    micro_batch_size: int


Event = SetupEvent | ResumeEvent | ProgressEvent | EpochEvent | OomEvent


# ----------------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------------


class HalfMetrics(_Data):
    accuracy: float | None
    per_class_accuracy: list[float | None]  # None for a class with no examples in this half
    ece: float | None  # expected calibration error of the raw logits
    ece_temperature: float | None  # ... after dividing them by the fitted temperature


class Metrics(_Data):
    """Accuracy and calibration of the final weights, per half of the test set."""

    temperature: float  # fitted on the public half only, applied to both
    accuracy_all: float | None = Field(json_schema_extra=PRIVATE)  # includes the private half
    public: HalfMetrics
    private: HalfMetrics = Field(json_schema_extra=PRIVATE)


class CompileInfo(_Data):
    enabled: bool
    seconds: float
    counted: bool  # whether compile warm-up counted against the budget's max_seconds


class Timings(_Data):
    """Wall seconds of each phase. Training and evaluation phases end with the device synchronised, so
    queued GPU work is inside the phase that queued it; train and eval count every attempt of the run (an
    earlier attempt's up to its last checkpoint). Setup (model, data onto the device) is this attempt's."""

    setup_seconds: float
    train_seconds: float  # every epoch trained, including those an earlier attempt checkpointed
    eval_seconds: float  # per-epoch plus final evaluation
    epoch_eval_seconds: float


class DeviceInfo(_Data):
    type: str
    name: str
    memory_bytes: int | None = None
    capability: str | None = None  # CUDA compute capability
    threads: int | None = None  # CPU intra-op threads
    cpu_capability: str | None = None  # CPU devices: the ATen CPU kernels in use (DEFAULT, AVX2, AVX512, ...)


class Versions(_Data):
    torch: str
    torchvision: str
    cuda: str | None
    cudnn: int | None
    python: str
    hparena: str  # the code's commit (see device.code_version)


class Resumed(_Data):
    """This run continued from a checkpoint of an earlier, interrupted attempt."""

    epochs: int  # whole epochs the checkpoint held
    steps: int
    earlier_attempt_seconds: list[float]  # each earlier attempt's device-seconds (training and evaluation,
    # measured as device_seconds is), up to its last checkpoint


class TestSplit(_Data):
    __test__ = False  # not a pytest class
    public: int
    private: int


class DatasetInfo(_Data):
    source: str
    content_hash: str
    train: int
    test: int
    classes: list[str]


class TrainResult(_Data):
    """Everything one run produced. Metrics are present only when it succeeded (a diverged or cancelled
    run has no final evaluation). The fp16 test-set logits and the test labels they were scored against ride
    along outside the record."""

    status: Outcome
    stop_reason: StopReason
    epochs_planned: int
    epochs_completed: int  # whole epochs only
    steps_completed: int
    steps_planned: int
    diverged_step: int | None = None
    diverged_epoch: int | None = None
    train_loss_final: float | None
    micro_batch_size: int  # smaller than the batch when out-of-memory halving kicked in
    effective_batch_size: int
    precision: str
    channels_last: bool
    memory_format_note: str | None
    compile: CompileInfo
    history: list[EpochRow]
    accuracy: float | None = None  # public half: the live leaderboard's score
    private_accuracy: float | None = Field(None, json_schema_extra=PRIVATE)
    metrics: Metrics | None = None
    evaluated_weights: Literal["raw", "ema", "swa"] | None = None
    images_per_sec: float | None
    timings: Timings
    # What the run cost: timings.train_seconds + timings.eval_seconds (all attempts; setup not counted).
    # GPU-seconds on a GPU, CPU-seconds on a CPU.
    device_seconds: float
    resumed: Resumed | None = None
    device: DeviceInfo
    peak_memory_bytes: int
    versions: Versions
    test_split: TestSplit
    dataset: DatasetInfo
    spec: RunSpec

    _logits: Any = PrivateAttr(default=None)
    _labels: Any = PrivateAttr(default=None)

    @property
    def logits(self) -> Any:
        """fp16 test-set logits (a torch tensor, rows in test-set order), or None when not succeeded."""
        return self._logits

    @property
    def labels(self) -> Any:
        """The test set's labels (a CPU int64 tensor, test-set order), or None when there are no logits: what
        the server scores per-image correctness and ensembles against."""
        return self._labels

    def with_logits(self, logits: Any, labels: Any = None) -> TrainResult:
        self._logits, self._labels = logits, labels
        return self

    def to_json(self) -> dict[str, Any]:
        """The record as strict JSON (NaN and inf become null)."""
        return json_safe(self.model_dump(mode="json"))

    def participant_json(self) -> dict[str, Any]:
        """The record without any field marked PRIVATE: tuning against the private half would defeat it."""
        return json_safe(self.model_dump(mode="json", exclude=_private_fields(TrainResult)))


def _private_fields(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic `exclude` tree of every field marked PRIVATE in `model` and the models it contains."""
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if (f.json_schema_extra or {}) == PRIVATE:
            out[name] = True
            continue
        inner = typing.get_args(f.annotation) if isinstance(f.annotation, types.UnionType) else (f.annotation,)
        for t in inner:
            if isinstance(t, type) and issubclass(t, BaseModel) and (sub := _private_fields(t)):
                out[name] = sub
    return out
