"""train(): the whole loop on tiny inputs — reproducibility, divergence, OOM micro-batching, budgets,
EMA/SWA, cancellation, events, the summary, learning, precision, and every option at once.

Everything runs on the CPU with a width-4/8 ResNet18 on 16x16 synthetic images (learnable by colour),
so each run is a fraction of a second once oneDNN has warmed up.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import worker.engine.device as device_mod
import worker.engine.train as train_mod
from tests.synthetic import synthetic_dataset
from worker.engine.config import Budget, ModelSpec, RunSpec, TrainConfig
from worker.engine.data import Dataset
from worker.engine.result import (
    EngineError,
    EpochEvent,
    Event,
    Outcome,
    ProgressEvent,
    SetupEvent,
    StopReason,
    StopRequested,
    TrainResult,
)
from worker.engine.train import train

N_TEST = 100
SIZE = 16

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models are too small to gain from more, and on a busy machine OpenMP
    threads spin-waiting on each other made this file 10x slower (80 s instead of 6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> Dataset:
    return synthetic_dataset(128, N_TEST, image_size=SIZE)


def _spec(*, epochs: int = 1, batch_size: int = 32, width: int = 4, seed: int = 0, budget: Budget | None = None,
          eval_every_epoch: bool = True, **cfg: Any) -> RunSpec:
    cfg.setdefault("ema_decay", None)  # the engine's default EMA is on; these tests compare against raw weights
    # Exact numerics on every CI CPU: "auto" would be bf16 on some CPUs and fp32 on others (tested apart).
    cfg.setdefault("precision", "fp32")
    return RunSpec(config=TrainConfig(epochs=epochs, batch_size=batch_size, **cfg), model=ModelSpec(width=width),
                   budget=budget or Budget(max_epochs=10), seed=seed, eval_every_epoch=eval_every_epoch)


def _run(spec: RunSpec, data: Dataset, on_event: Callable[[Event], None] | None = None
         ) -> tuple[TrainResult, list[dict]]:
    events: list[dict] = []

    def record(e: Event) -> None:
        events.append(e.model_dump())  # typed events, compared here by their JSON fields
        if on_event is not None:
            on_event(e)

    return train(spec, data, "cpu", record), events


def _kinds(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["kind"] == kind]


def _losses(result: TrainResult) -> list[float]:
    return [row["train_loss"] for row in result.to_json()["history"]]


def _hook_model(monkeypatch: pytest.MonkeyPatch, install: Callable[[nn.Module], None]) -> None:
    """Make train() build the real model, then let `install` add hooks to it."""
    real = train_mod.build_model

    def build(*args: Any, **kwargs: Any) -> nn.Module:
        model = real(*args, **kwargs)
        install(model)
        return model

    monkeypatch.setattr(train_mod, "build_model", build)


@pytest.fixture(scope="module")
def baseline(data: Dataset) -> tuple[RunSpec, TrainResult, list[dict]]:
    """The reference run: seed 0, 2 epochs of 4 steps, raw weights."""
    spec = _spec(epochs=2)
    result, events = _run(spec, data)
    return spec, result, events


# ----------------------------------------------------------------------------------------------------
# Reproducibility
# ----------------------------------------------------------------------------------------------------


def test_same_seed_is_bitwise_reproducible_and_another_seed_is_not(baseline, data: Dataset) -> None:
    spec, first, _ = baseline
    again, _ = _run(spec, data)
    other, _ = _run(spec.model_copy(update={"seed": 1}), data)

    assert first.logits is not None and again.logits is not None and other.logits is not None
    assert torch.equal(first.logits, again.logits)
    assert again.to_json()["accuracy"] == first.to_json()["accuracy"]
    assert again.to_json()["metrics"] == first.to_json()["metrics"]
    assert _losses(again) == _losses(first)
    assert len(_losses(first)) == 2

    assert not torch.equal(other.logits, first.logits)
    assert _losses(other) != _losses(first)


# ----------------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "epoch"), [(1, 1), (6, 2)])
def test_planted_nan_stops_at_once_as_diverged(monkeypatch, data: Dataset, k: int, epoch: int) -> None:
    forwards = {"n": 0}

    def install(model: nn.Module) -> None:
        def poison(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if not module.training:  # per-epoch evaluation is not a training forward
                return output
            forwards["n"] += 1
            return output * float("nan") if forwards["n"] >= k else output

        model.register_forward_hook(poison)

    _hook_model(monkeypatch, install)
    result, events = _run(_spec(epochs=3), data)  # 4 steps per epoch
    s = result.to_json()

    assert s["status"] == "diverged" and s["stop_reason"] == "diverged"
    assert s["diverged_step"] == k
    assert s["diverged_epoch"] == epoch
    assert s["steps_completed"] == k  # stopped at the first bad step, not at the end of the epoch
    assert forwards["n"] == k  # no training forward after the bad one
    assert s["epochs_completed"] == epoch - 1
    assert [e["epoch"] for e in _kinds(events, "epoch")] == list(range(1, epoch))
    assert len(s["history"]) == epoch - 1
    assert [e["step"] for e in _kinds(events, "progress")] == list(range(1, k))  # the bad step is not reported
    assert result.logits is None
    assert s["accuracy"] is None and s["evaluated_weights"] is None and s["metrics"] is None
    assert s["train_loss_final"] is None  # NaN is reported as missing, not as a number
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------------------------------
# Out of memory
# ----------------------------------------------------------------------------------------------------


def _oom_above(limit: int) -> Callable[[nn.Module], None]:
    def install(model: nn.Module) -> None:
        def pre(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if module.training and inputs[0].shape[0] > limit:
                raise torch.OutOfMemoryError("simulated")

        model.register_forward_pre_hook(pre)

    return install


def test_oom_falls_back_to_micro_batches_with_the_same_effective_batch(monkeypatch, data: Dataset) -> None:
    # What OOM recovery can promise. With BatchNorm in train mode, four forwards of 16 do not give the
    # gradient of one forward of 64 (each micro-batch is normalised by its own statistics, and running
    # stats are updated four times), so "same weights as the plain 64 run" would be false. What must
    # hold is that the optimizer still takes one step per 64 examples — the same examples, the same
    # augmentation, the same lr schedule — with the micro-batch losses weighted to the batch mean. That
    # is exactly what batch_size=16, grad_accum_steps=4 asks for, so the recovered run has to coincide
    # with that run (the simulated OOM fires before the model runs, so no half-done forward leaks in).
    accum, _ = _run(_spec(epochs=2, batch_size=16, grad_accum_steps=4), data)
    _hook_model(monkeypatch, _oom_above(16))
    oom, events = _run(_spec(epochs=2, batch_size=64), data)
    s = oom.to_json()

    assert s["status"] == "succeeded"
    assert [e["micro_batch_size"] for e in _kinds(events, "oom")] == [32, 16]  # halved once each, then kept
    assert s["micro_batch_size"] == 16
    assert s["effective_batch_size"] == 64 == accum.to_json()["effective_batch_size"]
    assert s["steps_planned"] == s["steps_completed"] == 2 * (128 // 64) == accum.to_json()["steps_completed"]
    assert oom.logits is not None and accum.logits is not None
    # Same arithmetic in the same order: not just close, identical.
    assert torch.equal(oom.logits, accum.logits)
    assert _losses(oom) == _losses(accum)


def _without_batchnorm(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())


def test_without_batchnorm_micro_batches_give_the_full_batch_gradient(monkeypatch, data: Dataset) -> None:
    # The test above cannot see a wrong micro-batch weighting (grad_accum_steps shares the code path).
    # Without BatchNorm every example's gradient is independent of the others in its forward, so the
    # micro-batched run must follow the plain batch-of-64 run up to float summation order.
    spec = _spec(epochs=2, batch_size=64, lr=0.02)
    _hook_model(monkeypatch, _without_batchnorm)
    plain, _ = _run(spec, data)

    def both(model: nn.Module) -> None:
        _without_batchnorm(model)
        _oom_above(16)(model)

    _hook_model(monkeypatch, both)
    micro, events = _run(spec, data)

    assert plain.to_json()["micro_batch_size"] == 64 and micro.to_json()["micro_batch_size"] == 16
    assert _kinds(events, "oom")
    assert micro.to_json()["steps_completed"] == plain.to_json()["steps_completed"] == 4
    assert plain.logits is not None and micro.logits is not None
    assert not torch.equal(plain.logits, torch.zeros_like(plain.logits))
    # fp16 logits: allow a rounding flip (~5e-4 near 0.5); a wrong weighting moves them by ~0.1 or more.
    torch.testing.assert_close(micro.logits.float(), plain.logits.float(), atol=2e-3, rtol=0)
    assert _losses(micro) == pytest.approx(_losses(plain), abs=1e-4)


def test_oom_even_at_micro_batch_one_is_an_engine_error(monkeypatch, data: Dataset) -> None:
    _hook_model(monkeypatch, _oom_above(0))
    events: list[dict] = []
    with pytest.raises(EngineError, match="out of memory even with micro-batch size 1"):
        train(_spec(batch_size=32), data, "cpu", lambda e: events.append(e.model_dump()))
    assert [e["micro_batch_size"] for e in _kinds(events, "oom")] == [16, 8, 4, 2, 1]


# ----------------------------------------------------------------------------------------------------
# Budget
# ----------------------------------------------------------------------------------------------------


def test_time_budget_stops_early_but_still_evaluates(data: Dataset) -> None:
    result, events = _run(_spec(epochs=3, budget=Budget(max_epochs=10, max_seconds=1e-6)), data)
    s = result.to_json()

    assert s["stop_reason"] == "time_budget"
    assert s["status"] == "succeeded"
    assert s["epochs_planned"] == 3
    assert s["epochs_completed"] == 0  # the one epoch it started was cut short: it does not count
    assert s["steps_completed"] == 1  # the CPU checks the clock after every step
    assert s["history"][0]["partial"] is True and s["history"][0]["steps"] == 1
    assert s["steps_completed"] < s["steps_planned"]
    assert 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["private_accuracy"] <= 1.0
    assert result.logits is not None and result.logits.shape == (N_TEST, 10)
    assert len(_kinds(events, "epoch")) == len(s["history"]) == 1


def test_budget_caps_the_configured_epochs(data: Dataset) -> None:
    small = synthetic_dataset(64, 20, image_size=SIZE)
    result, events = _run(_spec(epochs=5, budget=Budget(max_epochs=2), eval_every_epoch=False), small)
    s = result.to_json()

    assert s["epochs_planned"] == 2 and s["epochs_completed"] == 2
    assert s["steps_planned"] == s["steps_completed"] == 2 * (64 // 32)
    assert _kinds(events, "setup")[0]["epochs"] == 2
    assert [e["epoch"] for e in _kinds(events, "epoch")] == [1, 2]
    assert all(e["epochs"] == 2 for e in _kinds(events, "epoch"))
    # eval_every_epoch=False: no per-epoch test accuracy, but the final evaluation still happens.
    assert all(row["test_accuracy"] is None for row in s["history"])
    assert [(row["steps"], row["partial"]) for row in s["history"]] == [(64 // 32, False)] * 2
    assert 0.0 <= s["accuracy"] <= 1.0


def test_effective_batch_larger_than_the_training_set_is_an_engine_error(data: Dataset) -> None:
    with pytest.raises(EngineError, match="exceeds the 128 training images"):
        train(_spec(batch_size=64, grad_accum_steps=4), data, "cpu")


# ----------------------------------------------------------------------------------------------------
# EMA and SWA
# ----------------------------------------------------------------------------------------------------


def test_ema_weights_are_evaluated_instead_of_the_raw_ones(baseline, data: Dataset) -> None:
    spec, raw, _ = baseline
    ema, _ = _run(_spec(epochs=2, ema_decay=0.9), data)

    assert raw.to_json()["evaluated_weights"] == "raw"
    assert ema.to_json()["evaluated_weights"] == "ema"
    # Keeping an average does not change training itself (same seed: same losses) ...
    assert _losses(ema) == _losses(raw)
    # ... but a different set of weights is evaluated.
    assert ema.logits is not None and raw.logits is not None
    assert torch.isfinite(ema.logits.float()).all()
    assert not torch.allclose(ema.logits.float(), raw.logits.float())


def test_swa_weights_are_evaluated_instead_of_the_raw_ones(baseline, data: Dataset) -> None:
    _, raw, _ = baseline
    # swa_epochs=2 of 2 averages two snapshots; with a single snapshot SWA would equal the raw weights.
    swa, _ = _run(_spec(epochs=2, swa_epochs=2), data)

    assert swa.to_json()["evaluated_weights"] == "swa"
    assert _losses(swa) == _losses(raw)
    assert swa.logits is not None and raw.logits is not None
    assert torch.isfinite(swa.logits.float()).all()
    assert not torch.allclose(swa.logits.float(), raw.logits.float())


def test_swa_that_never_started_does_not_evaluate_the_initial_weights(data: Dataset) -> None:
    # The time budget stops training in epoch 1, before the SWA window (the last epoch of 3) opens:
    # the average holds no snapshot, so the trained raw weights must be evaluated, not the untrained copy.
    budget = Budget(max_epochs=10, max_seconds=1e-6)
    raw, _ = _run(_spec(epochs=3, budget=budget), data)
    swa, _ = _run(_spec(epochs=3, budget=budget, swa_epochs=1), data)

    assert swa.to_json()["stop_reason"] == "time_budget"
    assert swa.to_json()["evaluated_weights"] == "raw"
    assert raw.logits is not None and swa.logits is not None
    assert torch.equal(swa.logits, raw.logits)


# ----------------------------------------------------------------------------------------------------
# Cancellation
# ----------------------------------------------------------------------------------------------------


def _stop_at(kind: str, **match: Any) -> Callable[[Event], None]:
    def on_event(e: Event) -> None:
        if e.kind == kind and all(getattr(e, k) == v for k, v in match.items()):
            raise StopRequested

    return on_event


def test_stop_requested_after_the_first_epoch_cancels(data: Dataset) -> None:
    result, events = _run(_spec(epochs=3), data, _stop_at("epoch", epoch=1))
    s = result.to_json()

    assert s["status"] == "cancelled" and s["stop_reason"] == "cancelled"
    assert result.logits is None
    assert s["accuracy"] is None and s["metrics"] is None
    assert s["epochs_completed"] == 1
    assert s["steps_completed"] == 4  # nothing of epoch 2 ran
    assert [e["epoch"] for e in _kinds(events, "epoch")] == [1]
    json.dumps(s, allow_nan=False)


def test_stop_requested_mid_epoch_cancels_at_once(data: Dataset) -> None:
    result, events = _run(_spec(epochs=3), data, _stop_at("progress", step=2))
    assert result.to_json()["status"] == "cancelled"
    assert result.to_json()["steps_completed"] == 2
    assert _kinds(events, "epoch") == []
    assert result.logits is None


def test_stop_requested_at_setup_cancels_before_training(data: Dataset) -> None:
    # The worker's callback raises StopRequested on whatever event comes first once the run is
    # cancelled, which can be the setup event: that must still be a cancelled result, not a crash.
    result, events = _run(_spec(epochs=3), data, _stop_at("setup"))
    assert result.to_json()["status"] == "cancelled"
    assert result.to_json()["steps_completed"] == 0
    assert [e["kind"] for e in events] == ["setup"]
    assert result.logits is None


# ----------------------------------------------------------------------------------------------------
# Events and the summary
# ----------------------------------------------------------------------------------------------------

SETUP_KEYS = {"kind", "device", "precision", "total_steps", "epochs", "steps_per_epoch", "setup_seconds"}
PROGRESS_KEYS = {"kind", "epoch", "step", "total_steps", "loss", "lr", "images_per_sec"}
EPOCH_KEYS = {"kind", "epoch", "epochs", "train_loss", "steps", "partial", "lr", "seconds", "images_per_sec",
              "test_accuracy"}


def test_events_carry_the_documented_keys(baseline) -> None:
    _, result, events = baseline
    s = result.to_json()

    assert events[0]["kind"] == "setup" and len(_kinds(events, "setup")) == 1
    setup = events[0]
    assert set(setup) == SETUP_KEYS
    assert setup["device"] == "cpu" and setup["precision"] == "fp32"
    assert (setup["epochs"], setup["steps_per_epoch"], setup["total_steps"]) == (2, 4, 8)
    assert setup["setup_seconds"] >= 0

    progress = _kinds(events, "progress")
    assert progress and all(set(e) == PROGRESS_KEYS for e in progress)
    assert [e["step"] for e in progress] == list(range(1, 9))  # under 10 steps/epoch: every step
    assert all(e["total_steps"] == 8 and math.isfinite(e["loss"]) and e["lr"] >= 0 for e in progress)
    assert all(e["images_per_sec"] > 0 for e in progress)
    assert [e["epoch"] for e in progress] == [1] * 4 + [2] * 4

    epochs = _kinds(events, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert set(e) == EPOCH_KEYS
        assert e["epochs"] == 2
        assert 0.0 <= e["test_accuracy"] <= 1.0
        assert math.isfinite(e["train_loss"]) and e["seconds"] > 0 and e["images_per_sec"] > 0
    assert epochs[1]["seconds"] >= epochs[0]["seconds"]  # cumulative training time

    assert {e["kind"] for e in events} == {"setup", "progress", "epoch"}
    assert s["history"] == [{k: v for k, v in e.items() if k != "kind"} for e in epochs]
    assert s["train_loss_final"] == epochs[-1]["train_loss"]


def test_events_and_result_are_typed(data: Dataset) -> None:
    events: list[Event] = []
    result = train(_spec(epochs=1), data, "cpu", events.append)
    kinds = {SetupEvent: "setup", ProgressEvent: "progress", EpochEvent: "epoch"}
    assert all(isinstance(e, tuple(kinds)) and e.kind == kinds[type(e)] for e in events)
    assert (result.status, result.stop_reason) == (Outcome.succeeded, StopReason.completed)
    assert result.history == [e.row() for e in events if isinstance(e, EpochEvent)]
    # The stored JSON reads back as the same typed result (the worker stores it; anyone can re-read it).
    back = TrainResult.model_validate(json.loads(json.dumps(result.to_json())))
    assert back.model_dump() == result.model_dump() and back.logits is None  # logits travel apart
    assert result.metrics is not None and result.metrics.public.accuracy == result.accuracy
    # What participants see: every field computed on the private half is gone, the rest is the record.
    view, record = result.participant_json(), result.to_json()
    assert "private_accuracy" not in view and set(view["metrics"]) == {"temperature", "public"}
    assert view["metrics"]["public"] == record["metrics"]["public"] and view["history"] == record["history"]
    assert set(record) - set(view) == {"private_accuracy"}


def test_summary_is_strict_json_and_complete(baseline) -> None:
    spec, result, _ = baseline
    s = result.to_json()
    text = json.dumps(s, allow_nan=False)
    back = json.loads(text)

    assert back["status"] == "succeeded" and back["stop_reason"] == "completed"
    assert (back["epochs_completed"], back["steps_completed"]) == (2, 8)
    assert {"torch", "torchvision", "cuda", "cudnn", "python", "hparena"} <= set(back["versions"])
    assert back["versions"]["torch"] == torch.__version__
    assert back["device"]["type"] == "cpu" and back["device"]["name"].startswith("CPU")
    assert back["device"]["threads"] == torch.get_num_threads()
    assert set(back["timings"]) >= {"setup_seconds", "train_seconds", "eval_seconds"}
    assert all(back["timings"][k] > 0 for k in ("setup_seconds", "train_seconds", "eval_seconds"))
    # Device-seconds are the training and evaluation phases (device synchronised), not setup.
    t = back["timings"]
    assert back["device_seconds"] == pytest.approx(t["train_seconds"] + t["eval_seconds"])
    assert back["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert back["images_per_sec"] > 0
    assert isinstance(back["peak_memory_bytes"], int) and back["peak_memory_bytes"] > 0
    assert back["test_split"]["public"] + back["test_split"]["private"] == N_TEST
    assert back["dataset"]["train"] == 128 and back["dataset"]["test"] == N_TEST
    assert back["precision"] == "fp32" and back["micro_batch_size"] == 32 and back["effective_batch_size"] == 32
    assert 0.0 <= back["accuracy"] <= 1.0 and 0.0 <= back["private_accuracy"] <= 1.0
    assert back["metrics"]["public"]["accuracy"] == back["accuracy"]
    assert RunSpec.model_validate(back["spec"]) == spec

    assert result.logits is not None
    assert result.logits.dtype == torch.float16 and result.logits.shape == (N_TEST, 10)
    assert torch.isfinite(result.logits).all()


# ----------------------------------------------------------------------------------------------------
# Learning, precision, every option
# ----------------------------------------------------------------------------------------------------


def test_training_learns_the_synthetic_classes() -> None:
    data = synthetic_dataset(400, N_TEST, image_size=SIZE)
    result, _ = _run(_spec(epochs=3, width=8), data)
    s = result.to_json()

    assert s["status"] == "succeeded"
    assert s["accuracy"] > 0.5  # chance is 0.1; this setup reaches ~0.95
    losses = _losses(result)
    assert losses[-1] < losses[0] * 0.5


def test_fp16_on_cpu_is_an_engine_error(data: Dataset) -> None:
    with pytest.raises(EngineError, match="fp16 needs a CUDA device"):
        train(_spec(precision="fp16"), data, "cpu")


def test_auto_precision_on_cpu_is_bf16_only_with_native_bf16() -> None:
    from worker.engine.device import cpu_has_native_bf16, resolve_precision

    cpu = torch.device("cpu")
    native = cpu_has_native_bf16()
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    # Native only where the CPU has the instructions and nothing caps torch or oneDNN below them
    # (tests/engine/test_cpu_kinds.py runs the capped case in a subprocess).
    in_use = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")) and \
        os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() in {"ALL"} | device_mod.ONEDNN_BF16_ISAS
    assert native == (flags and in_use)
    assert resolve_precision("auto", cpu) == (("bf16", torch.bfloat16, False) if native else ("fp32", None, False))
    assert resolve_precision("fp32", cpu) == ("fp32", None, False)
    assert resolve_precision("bf16", cpu) == ("bf16", torch.bfloat16, False)
    result, events = _run(_spec(precision="auto"), synthetic_dataset(64, 20, image_size=SIZE))
    assert result.to_json()["precision"] == events[0]["precision"] == ("bf16" if native else "fp32")
    assert result.to_json()["status"] == "succeeded"


def test_bf16_on_cpu_runs_under_autocast() -> None:
    small = synthetic_dataset(64, 20, image_size=SIZE)
    result, events = _run(_spec(precision="bf16"), small)
    assert result.to_json()["status"] == "succeeded"
    assert result.to_json()["precision"] == "bf16" and events[0]["precision"] == "bf16"
    assert math.isfinite(result.to_json()["train_loss_final"])
    assert result.logits is not None and torch.isfinite(result.logits.float()).all()


EVERYTHING: dict[str, Any] = dict(
    mixup_alpha=0.4, cutmix_alpha=1.0, cutout_size=4, erasing_prob=0.5, jitter_brightness=0.3,
    jitter_contrast=0.3, jitter_saturation=0.3, jitter_hue=0.1, grayscale_prob=0.2, rotation_degrees=15.0,
    random_resized_crop=True, label_smoothing=0.1, grad_clip_norm=1.0, grad_accum_steps=2, stem="deep",
    se_blocks=True, dropout=0.2, tta="flip_translate", schedule="cosine", warmup_epochs=0.5, ema_decay=0.9,
)


@pytest.mark.parametrize("optimizer", [
    dict(optimizer="sgd", momentum=0.9, nesterov=True),
    dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, no_decay_norm_bias=True),
], ids=["sgd-nesterov", "adamw"])
def test_every_option_at_once_trains_to_a_finite_loss(data: Dataset, optimizer: dict[str, Any]) -> None:
    result, events = _run(_spec(batch_size=16, **EVERYTHING, **optimizer), data)
    s = result.to_json()

    assert s["status"] == "succeeded"
    assert s["effective_batch_size"] == 32 and s["steps_completed"] == 128 // 32
    assert math.isfinite(s["train_loss_final"])
    assert all(math.isfinite(e["loss"]) for e in _kinds(events, "progress"))
    # Warmup of half an epoch (2 steps): the first step runs at half the peak lr.
    lrs = [e["lr"] for e in _kinds(events, "progress")]
    assert lrs[0] == pytest.approx(lrs[1] / 2)
    assert s["evaluated_weights"] == "ema"
    assert result.logits is not None and torch.isfinite(result.logits.float()).all()
    assert 0.0 <= s["accuracy"] <= 1.0


def test_default_ema_ramps_up_so_short_runs_are_not_stuck_near_the_initialisation(data: Dataset) -> None:
    from worker.engine.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False), torch.nn.BatchNorm1d(1))
    torch.nn.init.zeros_(model[0].weight)
    ema = EMA(model, 0.99)
    torch.nn.init.ones_(model[0].weight)
    model[1].num_batches_tracked.fill_(9)
    ema.update()  # first update: decay 1/10, the average moves 90% of the way
    assert torch.allclose(ema.module[0].weight, torch.full((1, 3), 0.9))
    assert int(ema.module[1].num_batches_tracked) == 9  # integer buffers follow the model
    assert not ema.module[0].weight.requires_grad and model[0].weight.requires_grad
    for _ in range(1000):
        ema.update()
    assert ema.current_decay() == 0.99
    result, _ = _run(_spec(epochs=2, ema_decay=0.99), data)
    assert result.to_json()["evaluated_weights"] == "ema"
    assert result.to_json()["accuracy"] > 0.3  # a fixed 0.99 after ~20 steps would still be near chance
