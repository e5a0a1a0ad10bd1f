"""Optimizer construction: per-stage parameter groups, LR multipliers, and norm/bias weight-decay exclusion.

Each param group carries two extra keys that torch optimizers keep untouched:
  * `lr_mult`: the stage's multiplier; the training loop sets `group["lr"] = cfg.lr * lr_mult * factor`
    every step (see `set_lr`), so schedules stay stage-relative.
  * `name`: "<stage>/decay" or "<stage>/no_decay" (just "<stage>" when norm/bias exclusion is off),
    for logging and tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.engine.config import TrainConfig

# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------

# Order matters only for readability of logs: input to output.
STAGES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")

# Top-level module name -> stage. The stem lives in conv1/bn1 for every stem variant (see model.py).
_MODULE_STAGE = {"conv1": "stem", "bn1": "stem", "layer1": "layer1", "layer2": "layer2",
                 "layer3": "layer3", "layer4": "layer4", "fc": "fc"}

# Wrappers that prefix parameter names: torch.compile and DataParallel/DDP.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def stage_of(param_name: str) -> str:
    """Stage of a parameter from its qualified name, e.g. "layer2.0.conv1.weight" -> "layer2"."""
    name = param_name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    top = name.split(".", 1)[0]
    try:
        return _MODULE_STAGE[top]
    except KeyError:
        # Silently dropping a parameter would freeze it; silently guessing a stage would mis-scale it.
        raise ValueError(f"parameter {param_name!r} belongs to no known stage (expected one of "
                         f"{sorted(_MODULE_STAGE)})") from None


def lr_mult(cfg: TrainConfig, stage: str) -> float:
    return float(getattr(cfg, f"lr_mult_{stage}"))


# ----------------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters split by stage and (optionally) decay/no-decay; empty groups omitted.

    With `cfg.no_decay_norm_bias`, tensors with ndim <= 1 (BatchNorm weights/biases, conv/linear biases)
    get weight_decay 0: decaying them only shrinks the normalisation scale and hurts accuracy.
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.no_decay_norm_bias and p.ndim <= 1
        buckets.setdefault((stage_of(name), no_decay), []).append(p)

    groups: list[dict[str, Any]] = []
    for stage in STAGES:
        for no_decay in (False, True):
            params = buckets.get((stage, no_decay))
            if not params:
                continue
            if cfg.no_decay_norm_bias:
                name = f"{stage}/{'no_decay' if no_decay else 'decay'}"
            else:
                name = stage
            groups.append({
                "params": params,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "lr_mult": lr_mult(cfg, stage),
                "name": name,
            })
    return groups


# ----------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over `param_groups`, each group starting at lr = cfg.lr * lr_mult."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]

    # foreach: one multi-tensor kernel per op instead of one launch per parameter (large win on GPU).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            # torch rejects nesterov without momentum; the config allows the combination, so drop it.
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            foreach=True,
        )
    if cfg.optimizer == "adam":
        # Adam's weight_decay is coupled L2 (added to the gradient), as the config documents.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, foreach=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every group's lr to base_lr * lr_mult * factor (factor = the schedule's value this step)."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_mult", 1.0) * factor


__all__ = ["STAGES", "build_optimizer", "lr_mult", "param_groups", "set_lr", "stage_of"]
