"""Checkpoints: a run's whole training state at the end of an epoch, so a retried attempt resumes there.

The state is everything the next epoch reads: weights, optimizer, loss scaler, EMA and SWA averages, the
data-order and augmentation generator, the global RNG (dropout), and the loop's counters and history. An
epoch boundary is the one place where nothing else is in flight (no half-drawn permutation, no partial
loss sum), so a resumed run continues exactly where the interrupted one stood: with `deterministic` set it
ends bit for bit equal to a run that was never interrupted.

A checkpoint names the spec it belongs to (RunSpec.identity) and the setting it was saved in (device type,
resolved precision, code version): one for another spec, or saved on another kind of device or by other
code, is ignored and the run starts over; it is never loaded into a run it doesn't fit. Files are written
whole or not at all (temporary file, fsync, rename), so a process killed while saving leaves the previous
checkpoint in place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FILE = "checkpoint.pt"
FORMAT = 1


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    # weights_only: a checkpoint is data (tensors, numbers, lists, dicts), never code to unpickle.
    state = torch.load(path, map_location="cpu", weights_only=True)
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
    for tmp in directory.glob(".checkpoint-*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # not empty (a stray temporary file) or already gone
        pass
