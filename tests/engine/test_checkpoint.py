"""Checkpoint and resume: a run interrupted after an epoch (an exception, or its process killed outright)
and resumed from its checkpoint ends bit for bit equal to the same run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.synthetic import synthetic_dataset
from worker.engine import checkpoint
from worker.engine.config import Budget, ModelSpec, RunSpec, TrainConfig
from worker.engine.result import EpochEvent, Event, ResumeEvent
from worker.engine.train import train

REPO = Path(__file__).resolve().parents[2]
SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed child runs with one thread too: the same kernels, the same sums
    yield
    torch.set_num_threads(before)


def _spec(seed: int = 0) -> RunSpec:
    # Everything that carries state across epochs: momentum, EMA, SWA, mixup and dropout (the global RNG),
    # augmentation (the run's generator), a schedule over all steps.
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, ema_decay=0.9, swa_epochs=2, mixup_alpha=0.4,
                      dropout=0.2, cutout_size=4, precision="fp32", tta="flip")
    return RunSpec(config=cfg, model=ModelSpec(width=4), budget=Budget(max_epochs=4), seed=seed,
                   deterministic=True)


def _data():
    return synthetic_dataset(128, 60, image_size=SIZE)


class _Crash(Exception):
    pass


def _crash_after(epoch: int):
    def on_event(e: Event) -> None:
        if isinstance(e, EpochEvent) and e.epoch == epoch:
            raise _Crash  # after the epoch's checkpoint was written, as a real crash would be
    return on_event


def _fingerprint(r) -> dict:
    return {"losses": [row.train_loss for row in r.history], "accs": [row.test_accuracy for row in r.history],
            "metrics": r.metrics.model_dump(), "logits": r.logits.numpy().tobytes().hex()}


def test_a_run_resumed_after_a_crash_equals_the_uninterrupted_run(tmp_path):
    data = _data()
    whole = train(_spec(), data, "cpu")
    with pytest.raises(_Crash):
        train(_spec(), data, "cpu", _crash_after(2), checkpoint_dir=tmp_path)
    assert (tmp_path / checkpoint.FILE).is_file()

    events: list[Event] = []
    resumed = train(_spec(), data, "cpu", events.append, checkpoint_dir=tmp_path)
    assert _fingerprint(resumed) == _fingerprint(whole)
    assert resumed.resumed is not None and (resumed.resumed.epochs, resumed.resumed.steps) == (2, 8)
    assert len(resumed.resumed.earlier_attempt_seconds) == 1
    assert resumed.device_seconds > sum(resumed.resumed.earlier_attempt_seconds)
    # The lost attempt's share: its two epochs' training and evaluation, as the phase counters carried on.
    t = resumed.timings
    assert resumed.device_seconds == pytest.approx(t.train_seconds + t.eval_seconds)
    assert resumed.history[1].seconds <= resumed.resumed.earlier_attempt_seconds[0] < resumed.device_seconds
    # The caller hears which epochs came back (to show the curve again) and then only the new ones.
    (resume,) = [e for e in events if isinstance(e, ResumeEvent)]
    assert (resume.epochs_done, [row.epoch for row in resume.history]) == (2, [1, 2])
    assert [e.epoch for e in events if isinstance(e, EpochEvent)] == [3, 4]
    assert whole.resumed is None


@pytest.mark.slow
def test_checkpoints_are_spaced_by_the_interval_and_resume_from_the_last_one(tmp_path):
    data = _data()
    with pytest.raises(_Crash):  # a long interval: only the first epoch was saved before epoch 3 crashed
        train(_spec(), data, "cpu", _crash_after(3), checkpoint_dir=tmp_path, checkpoint_every_seconds=1e9)
    resumed = train(_spec(), data, "cpu", checkpoint_dir=tmp_path, checkpoint_every_seconds=1e9)
    assert resumed.resumed is not None and resumed.resumed.epochs == 1
    assert _fingerprint(resumed) == _fingerprint(train(_spec(), data, "cpu"))
    # The last epoch is always saved, whatever the interval: a retry after it goes straight to evaluation.
    again = train(_spec(), data, "cpu", checkpoint_dir=tmp_path, checkpoint_every_seconds=1e9)
    assert again.resumed is not None and again.resumed.epochs == 4 and again.steps_completed == 16


@pytest.mark.slow
def test_a_checkpoint_of_another_spec_is_never_loaded(tmp_path):
    data = _data()
    with pytest.raises(_Crash):
        train(_spec(seed=1), data, "cpu", _crash_after(1), checkpoint_dir=tmp_path)
    other = train(_spec(seed=2), data, "cpu", checkpoint_dir=tmp_path)
    assert other.resumed is None and other.epochs_completed == 4
    assert _fingerprint(other) == _fingerprint(train(_spec(seed=2), data, "cpu"))
    checkpoint.remove(tmp_path)
    assert not tmp_path.exists()


KILLED = """
import os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.engine.test_checkpoint import _data, _spec
from worker.engine.result import EpochEvent
from worker.engine.train import train

def on_event(e):
    if isinstance(e, EpochEvent) and e.epoch == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: what the OOM killer does

train(_spec(), _data(), "cpu", on_event, checkpoint_dir={ckpt!r})
"""


@pytest.mark.slow
def test_a_killed_process_resumes_from_its_last_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED.format(repo=str(REPO), ckpt=str(tmp_path)))],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    data = _data()
    resumed = train(_spec(), data, "cpu", checkpoint_dir=tmp_path)
    assert resumed.resumed is not None and resumed.resumed.epochs == 3
    assert _fingerprint(resumed) == _fingerprint(train(_spec(), data, "cpu"))
    assert json.dumps(resumed.to_json(), allow_nan=False)


def _edit(directory: Path, **changes) -> None:
    state = torch.load(directory / checkpoint.FILE, weights_only=True)
    for key, value in changes.items():
        if key in state["progress"]:
            state["progress"][key] = value
        else:
            state[key] = value
    torch.save(state, directory / checkpoint.FILE)


@pytest.mark.slow
def test_a_checkpoint_saved_in_another_setting_is_ignored(tmp_path):
    """Same spec, but saved by other code (or on another kind of device, or where `auto` resolved to another
    precision): its state may not fit this run, so the run starts over instead of failing on it."""
    data = _data()
    with pytest.raises(_Crash):
        train(_spec(), data, "cpu", _crash_after(2), checkpoint_dir=tmp_path)
    _edit(tmp_path, setting={"device": "cuda", "precision": "fp16", "code": "0000000"})
    fresh = train(_spec(), data, "cpu", checkpoint_dir=tmp_path)
    assert fresh.resumed is None and fresh.epochs_completed == 4
    (tmp_path / checkpoint.FILE).write_bytes(b"truncated")  # not even a checkpoint: also a fresh start
    assert train(_spec(), data, "cpu", checkpoint_dir=tmp_path).resumed is None


@pytest.mark.slow
def test_a_run_stopped_by_its_time_budget_is_not_trained_further_on_resume(tmp_path):
    data = _data()
    with pytest.raises(_Crash):
        train(_spec(), data, "cpu", _crash_after(2), checkpoint_dir=tmp_path)
    _edit(tmp_path, stop_reason="time_budget")  # as if the budget ran out exactly at the end of epoch 2
    r = train(_spec(), data, "cpu", checkpoint_dir=tmp_path)
    assert (r.stop_reason, r.epochs_completed, r.steps_completed, len(r.history)) == ("time_budget", 2, 8, 2)


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_does_not_fail_the_run(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = train(_spec(), _data(), "cpu", checkpoint_dir=blocker / "ckpt")  # mkdir fails: NotADirectoryError
    assert r.status == "succeeded" and r.epochs_completed == 4
    assert "checkpoint not saved" in caplog.text
