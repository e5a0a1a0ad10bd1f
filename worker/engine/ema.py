"""Averaged weights: an EMA updated every few steps, SWA over the last epochs, and which one is evaluated."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class EMA(nn.Module):
    """An exponential moving average of a model's weights and float buffers (BatchNorm statistics).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over its n updates: a fixed 0.99 would still
    carry the random initialisation after 100 steps, which is a whole short run; the ramp lets the
    average follow early training and settle at `decay` once there is history. n is a Python int, so
    the ramp never reads anything back from the GPU.

    Each update is two foreach calls over flat tensor lists built once: a lerp of the float tensors and a
    copy of the integer buffers (0.18 ms on CPU for a width-16 ResNet18, against 0.76 ms for torch's
    AveragedModel, which walks every tensor in Python per call).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0
        # (average, model) tensor lists. The model side is detached views: they share storage with the
        # parameters the optimizer updates in place. Integer buffers (BatchNorm's batch counter) are not
        # averaged: they follow the model.
        self._avg: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._copy: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for e, m in zip([*self.module.parameters(), *self.module.buffers()],
                        [*model.parameters(), *model.buffers()], strict=True):
            lists = self._avg if e.is_floating_point() else self._copy
            lists[0].append(e)
            lists[1].append(m.detach())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._avg[0], self._avg[1], 1.0 - self.current_decay())
        if self._copy[0]:
            torch._foreach_copy_(self._copy[0], self._copy[1])
        self.updates += 1


def eval_model(model: nn.Module, ema: EMA | None, swa: AveragedModel | None, *, final: bool) -> nn.Module:
    """The weights to evaluate: SWA's average for the final evaluation once it holds one, else the EMA,
    else the raw model. Per-epoch evaluations never use SWA: its window is the last epochs only."""
    if final and swa_ready(swa):
        return swa
    return ema if ema is not None else model


def swa_ready(swa: AveragedModel | None) -> bool:
    # Only once it holds a snapshot: a time budget can stop a run before the SWA window opens, and an
    # empty average still holds the untrained weights it was copied from.
    return swa is not None and int(swa.n_averaged) > 0


def weights_name(ema: EMA | None, swa: AveragedModel | None) -> str:
    if swa_ready(swa):
        return "swa"
    return "ema" if ema is not None else "raw"
