"""Checkpoints: a run's whole training state at the end of an epoch, so a retried attempt resumes there.

The state is everything the next epoch reads: weights, optimizer, loss scaler, EMA and SWA averages, the
data-order and augmentation generator, the global RNG (dropout), and the loop's counters and history. An
epoch boundary is the one place where nothing else is in flight (no half-drawn permutation, no partial
loss sum), so a resumed run continues exactly where the interrupted one stood: with `deterministic` set it
ends bit for bit equal to a run that was never interrupted.

A checkpoint names the spec it belongs to (RunSpec.identity) and the setting it was saved in (device type,
resolved precision, code version): one for another spec, or saved on another kind of device or by other
code, is ignored and the run starts over; it is never loaded into a run it doesn't fit. Files are written
whole or not at all (packing.atomic_save), so a process killed while saving leaves the previous checkpoint
in place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from worker.engine.device import code_version
from worker.engine.packing import atomic_save
from worker.engine.result import EpochRow, StopReason
from worker.engine.state import Progress, Setup

log = logging.getLogger("hparena.engine")
FILE = "checkpoint.pt"
FORMAT = 1


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FILE
    atomic_save({"format": FORMAT, **state}, target)
    return target


def load(directory: str | Path | None, identity: str, setting: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in `directory` if there is one for the spec with this identity, saved in the same
    setting (device type, resolved precision, code version: what decides the shape of the saved state),
    else None. A run that can't resume starts over; it never fails on a checkpoint."""
    if directory is None:
        return None
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    try:
        # weights_only: a checkpoint is data (tensors, numbers, lists, dicts), never code to unpickle.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated by a copy that wasn't ours, unreadable, not a checkpoint at all
        log.warning("ignoring the unreadable checkpoint %s: %s", path, e)
        return None
    if not isinstance(state, dict):
        return None
    if state.get("format") != FORMAT or state.get("identity") != identity or state.get("setting") != setting:
        return None
    return state


def remove(directory: str | Path | None) -> None:
    """Drop a finished run's checkpoint and any temporary file a kill mid-save left (the directory too,
    once empty; anything else in it is not ours and stays)."""
    if directory is None:
        return
    directory = Path(directory)
    (directory / FILE).unlink(missing_ok=True)
    for tmp in directory.glob(f".{FILE}.*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # holds files that are not ours, or is already gone
        pass


# ----------------------------------------------------------------------------------------------------
# A training run's state (worker.engine.state)
# ----------------------------------------------------------------------------------------------------


def setting_of(s: Setup) -> dict[str, str]:
    return {"device": s.device.type, "precision": s.precision, "code": code_version()}


def save_run(s: Setup, p: Progress) -> None:
    """Save the state after a whole epoch. A checkpoint only saves work: if it can't be written (a full or
    unreachable disk), training goes on without it."""
    try:
        _write(s, p)
    except OSError as e:
        log.warning("checkpoint not saved in %s: %s; training goes on", s.checkpoint_dir, e)


def _write(s: Setup, p: Progress) -> None:
    save(s.checkpoint_dir, {
        "identity": s.spec.identity(), "setting": setting_of(s),
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "scaler": s.scaler.state_dict(),
        "ema": None if s.ema is None else {"module": s.ema.module.state_dict(), "updates": s.ema.updates},
        "swa": None if s.swa is None else s.swa.state_dict(),
        "gen": s.gen.get_state(), "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None,
        "progress": {"step": p.step, "images_seen": p.images_seen, "epochs_done": p.epochs_done,
                     "train_seconds": p.train_seconds, "epoch_eval_seconds": p.epoch_eval_seconds,
                     "compile_seconds": p.compile_seconds, "last_loss": p.last_loss, "micro": p.micro,
                     "stop_reason": p.stop_reason.value, "history": [row.model_dump() for row in p.history]},
        # This attempt's device-seconds so far, measured as TrainResult.device_seconds is (the phase counters
        # above already include the earlier attempts').
        "attempt_seconds": [*p.earlier_attempt_seconds,
                            max(0.0, p.train_seconds + p.epoch_eval_seconds - sum(p.earlier_attempt_seconds))],
    })


def restore_run(s: Setup, p: Progress, state: dict | None) -> None:
    """Put a checkpoint's state into the freshly set-up run: tensors are copied in place, so the EMA's and
    the optimizer's references to the model's tensors stay valid."""
    if state is None:
        return
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scaler.load_state_dict(state["scaler"])
    if s.ema is not None:
        s.ema.module.load_state_dict(state["ema"]["module"])
        s.ema.updates = state["ema"]["updates"]
    if s.swa is not None:
        s.swa.load_state_dict(state["swa"])
    s.gen.set_state(state["gen"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and s.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], s.device)
    saved = state["progress"]
    for name in ("step", "images_seen", "epochs_done", "train_seconds", "epoch_eval_seconds", "compile_seconds",
                 "last_loss", "micro"):
        setattr(p, name, saved[name])
    p.stop_reason = StopReason(saved["stop_reason"])
    p.history = [EpochRow.model_validate(row) for row in saved["history"]]
    p.earlier_attempt_seconds = list(state["attempt_seconds"])
    p.resumed_at = (p.epochs_done, p.step)
