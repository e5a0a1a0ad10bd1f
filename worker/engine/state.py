"""A training run's state: what setup builds once (Setup) and what the loop has done so far (Progress).

train.py reads and advances them; checkpoint.py saves and restores their stateful parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from worker.engine.config import RunSpec, TrainConfig
from worker.engine.ema import EMA
from worker.engine.result import EpochRow, StopReason


@dataclass
class Setup:
    """Everything the loop needs, built once before the first step."""

    spec: RunSpec
    cfg: TrainConfig
    device: torch.device
    precision: str
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    train_x: torch.Tensor  # uint8, on the device
    train_y: torch.Tensor
    mean: list[float]
    std: list[float]
    public_idx: torch.Tensor
    private_idx: torch.Tensor
    model: nn.Module
    step_model: nn.Module  # the model, or its torch.compile wrapper
    channels_last: bool
    memory_format_note: str | None
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    swa: AveragedModel | None
    gen: torch.Generator  # data order and augmentation
    epochs: int
    effective_batch: int
    steps_per_epoch: int
    check_every: int  # steps between looks at the loss and the clock
    setup_seconds: float
    checkpoint_dir: Path | None  # where whole epochs' state is saved, if anywhere
    checkpoint_every: float  # seconds at least between two checkpoints (0: after every epoch)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class Progress:
    """What the loop has done so far; the final result is built from it."""

    micro: int  # micro-batch size, halved on out-of-memory
    first_bad: torch.Tensor  # the first non-finite step (1-based) on the device, -1 while none
    step: int = 0
    images_seen: int = 0
    epochs_done: int = 0  # whole epochs
    stop_reason: StopReason = StopReason.completed
    diverged_step: int | None = None
    diverged_epoch: int | None = None
    train_seconds: float = 0.0
    epoch_eval_seconds: float = 0.0
    compile_seconds: float = 0.0
    last_loss: float = float("nan")
    history: list[EpochRow] = field(default_factory=list)
    # Device-seconds of earlier attempts of this run, each up to its last checkpoint (empty: a first attempt).
    earlier_attempt_seconds: list[float] = field(default_factory=list)
    resumed_at: tuple[int, int] | None = None  # (epochs, steps) a checkpoint restored
    checkpointed_at: float = float("-inf")  # perf_counter of the last checkpoint this attempt saved
