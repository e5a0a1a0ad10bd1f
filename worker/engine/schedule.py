"""Learning-rate schedules as a pure function of the optimizer step.

`lr_factor` returns the multiplier on the peak lr (`cfg.lr`); the trainer sets each param group's lr to
`cfg.lr * lr_mult * lr_factor(step, ...)` before every optimizer step. Being a plain function of the step
(not a stateful torch scheduler) makes it trivial to resume, to plot, and to test exactly.
"""

from __future__ import annotations

import math

from worker.engine.config import TrainConfig

ONECYCLE_START = 1 / 25  # torch OneCycleLR's default div_factor


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier on the peak lr for optimizer step `step` (0-based) of `total_steps`.

    Warmup: with W = round(cfg.warmup_epochs * steps_per_epoch) > 0, steps s < W get (s + 1) / W,
    reaching 1.0 on step W - 1, whatever the schedule.

    After warmup, with progress t = (s - W) / (total_steps - W - 1) running from 0 on the first
    post-warmup step to exactly 1 on the last step (clamped to [0, 1]; t = 0 if only one step is left):

    - constant:  1
    - step:      gamma ** floor(epoch / step_size)
    - multistep: gamma ** #{m in milestones : m <= epoch}
    - cosine:    f + (1 - f) * (1 + cos(pi * t)) / 2
    - onecycle:  0.04 + (1 - 0.04) * t / p          for t <= p
                 1 + (f - 1) * (t - p) / (1 - p)    for t >  p

    where f = cfg.final_lr_frac, p = cfg.onecycle_pct_start, and epoch = s / steps_per_epoch counts
    from step 0 (warmup included), so `step_size` and `milestones` are epochs of the whole run. The
    step-based decays are evaluated in integers, so an epoch boundary lands exactly on its step.
    """
    if total_steps < 1 or steps_per_epoch < 1:
        raise ValueError("total_steps and steps_per_epoch must be positive")
    if step < 0:
        raise ValueError("step must be >= 0")
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup

    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(1 for m in cfg.milestones if m * steps_per_epoch <= step)

    span = total_steps - warmup - 1
    t = min(max((step - warmup) / span, 0.0), 1.0) if span > 0 else 0.0
    final = cfg.final_lr_frac
    if cfg.schedule == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        pct = cfg.onecycle_pct_start
        if t <= pct:
            return ONECYCLE_START + (1 - ONECYCLE_START) * t / pct
        return 1 + (final - 1) * (t - pct) / (1 - pct)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def lr_curve(total_steps: int, steps_per_epoch: int, cfg: TrainConfig) -> list[float]:
    """`lr_factor` for every step of a run, e.g. to plot or to report the schedule."""
    return [lr_factor(s, total_steps, steps_per_epoch, cfg) for s in range(total_steps)]
