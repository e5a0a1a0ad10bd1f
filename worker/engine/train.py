"""The training loop: RunSpec + Dataset + device -> TrainResult, with progress through one callback.

Read top to bottom: setup (precision, data on the device, model, optimizer), the step (with out-of-memory
micro-batching), the epoch (budget, divergence, EMA/SWA, per-epoch evaluation) and the final evaluation
(TTA, public/private halves, calibration, logits). No database, no Celery.

`on_event` receives the typed events of `worker.engine.result`: one SetupEvent, a ResumeEvent when a
checkpoint was restored, ProgressEvents about ten times an epoch, an EpochEvent after each epoch, and an
OomEvent whenever a step is redone with a smaller micro-batch. It may raise `StopRequested` to cancel;
the engine then returns a result with status "cancelled".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from worker.engine import checkpoint
from worker.engine.augment import augment_batch, mix_batch
from worker.engine.config import RunSpec
from worker.engine.data import Dataset
from worker.engine.device import (
    device_info,
    peak_memory,
    resolve_device,
    resolve_precision,
    seed_everything,
    tune_cpu_allocator,
    versions,
)
from worker.engine.ema import EMA, eval_model, weights_name
from worker.engine.evaluate import evaluate_halves, predict_logits, split_public_private
from worker.engine.model import build_model, choose_memory_format
from worker.engine.optim import build_optimizer, set_lr
from worker.engine.result import (
    CompileInfo,
    DatasetInfo,
    EngineError,
    EpochEvent,
    Event,
    Metrics,
    OomEvent,
    Outcome,
    ProgressEvent,
    Resumed,
    ResumeEvent,
    SetupEvent,
    StopReason,
    StopRequested,
    TestSplit,
    Timings,
    TrainResult,
)
from worker.engine.schedule import lr_factor
from worker.engine.state import Progress, Setup

__all__ = ["EngineError", "Event", "StopRequested", "TrainResult", "channel_stats", "train"]

EVAL_BATCH = 1024


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------


def channel_stats(x: torch.Tensor, sample: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std on the [0, 1] scale from a fixed sample of the training set."""
    xs = x[:sample].float().div_(255)
    return xs.mean(dim=(0, 2, 3)).tolist(), xs.std(dim=(0, 2, 3)).tolist()


def _setup(spec: RunSpec, data: Dataset, device: torch.device, t_start: float,
           checkpoint_dir: Path | None, checkpoint_every: float) -> Setup:
    cfg = spec.config
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        tune_cpu_allocator()
    seed_everything(spec.seed, spec.deterministic)
    precision, amp_dtype, use_scaler = resolve_precision(cfg.precision, device)

    # The whole dataset lives on the device as uint8; batches are drawn by index, never through a loader.
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    mean, std = channel_stats(data.train_x)
    public_idx, private_idx = split_public_private(len(data.test_y))

    model = build_model(spec.model, cfg, data.num_classes)
    channels_last, memory_format_note = choose_memory_format(model, device.type, cfg.channels_last)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    swa = AveragedModel(model, use_buffers=True) if cfg.swa_epochs > 0 else None
    step_model = torch.compile(model) if cfg.compile else model
    gen = torch.Generator(device=device).manual_seed(spec.seed)

    effective_batch = cfg.batch_size * cfg.grad_accum_steps
    if effective_batch > len(train_y):
        raise EngineError(f"batch_size*grad_accum_steps={effective_batch} exceeds the {len(train_y)} training "
                          "images")
    return Setup(
        spec=spec, cfg=cfg, device=device, precision=precision, amp_dtype=amp_dtype, scaler=scaler,
        train_x=train_x, train_y=train_y, mean=mean, std=std, public_idx=public_idx, private_idx=private_idx,
        model=model, step_model=step_model, channels_last=channels_last, memory_format_note=memory_format_note,
        optimizer=optimizer, ema=ema, swa=swa, gen=gen,
        # A validated RunSpec has resolved this already; asking the budget again covers a copied or
        # constructed spec that skipped validation.
        epochs=spec.budget.epochs_for(cfg),
        effective_batch=effective_batch,
        steps_per_epoch=len(train_y) // effective_batch,  # drop the ragged last batch: every step the same shape
        # CUDA runs asynchronously: only look at loss and clock every few steps so the GPU never waits on us.
        check_every=1 if device.type == "cpu" else 10,
        setup_seconds=time.perf_counter() - t_start,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
    )


def train(spec: RunSpec, data: Dataset, device: str | torch.device = "auto",
          on_event: Callable[[Event], None] | None = None, checkpoint_dir: str | Path | None = None,
          checkpoint_every_seconds: float = 0.0) -> TrainResult:
    """With `checkpoint_dir`, the state after a whole epoch is saved there (after every epoch, or after the
    first epoch to end `checkpoint_every_seconds` or more since the last save, and always after the last),
    and a checkpoint already there for this spec is resumed from (see worker.engine.checkpoint). The caller
    removes it once the run is over."""
    emit = on_event or (lambda _e: None)
    t_start = time.perf_counter()
    s = _setup(spec, data, resolve_device(device), t_start, Path(checkpoint_dir) if checkpoint_dir else None,
               checkpoint_every_seconds)
    p = Progress(micro=s.cfg.batch_size, first_bad=torch.tensor(-1, device=s.device))
    checkpoint.restore_run(s, p, checkpoint.load(s.checkpoint_dir, spec.identity(), checkpoint.setting_of(s)))
    try:
        # Inside the try: a callback may already ask to stop on the setup event (a run cancelled while queued).
        emit(SetupEvent(device=str(s.device), precision=s.precision, total_steps=s.total_steps, epochs=s.epochs,
                        steps_per_epoch=s.steps_per_epoch, setup_seconds=s.setup_seconds))
        if p.resumed_at is not None:
            emit(ResumeEvent(epochs_done=p.epochs_done, steps_done=p.step, history=p.history))
        for epoch in range(p.epochs_done, s.epochs):
            if p.stop_reason != StopReason.completed:  # also a checkpoint saved as the time budget ran out
                break
            _train_epoch(s, p, epoch, data, emit)
    except StopRequested:
        p.stop_reason = StopReason.cancelled
    return _final_result(s, p, data)


# ----------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------


def _loss(out: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, lam: float, smoothing: float) -> torch.Tensor:
    loss = F.cross_entropy(out, ya, label_smoothing=smoothing)
    if lam < 1.0:
        loss = lam * loss + (1 - lam) * F.cross_entropy(out, yb, label_smoothing=smoothing)
    return loss


def _train_step(s: Setup, p: Progress, idx: torch.Tensor, emit: Callable[[Event], None]) -> torch.Tensor:
    """Forward/backward over `idx` in micro-batches of `p.micro`; on OOM halve `p.micro` and redo."""
    cfg, device, optimizer, scaler = s.cfg, s.device, s.optimizer, s.scaler
    # index_select, not train_x[idx]: advanced indexing of a uint8 tensor is ~25x slower on CPU.
    x = augment_batch(s.train_x.index_select(0, idx), cfg, s.gen, mean=s.mean, std=s.std)  # uint8 in, float out
    x, ya, yb, lam = mix_batch(x, s.train_y.index_select(0, idx), cfg, s.gen)
    x = x.contiguous(memory_format=s.memory_format)
    n = len(idx)
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            total = torch.zeros((), device=device)
            for lo in range(0, n, p.micro):
                hi = min(lo + p.micro, n)
                with torch.autocast(device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
                    loss = _loss(s.step_model(x[lo:hi]), ya[lo:hi], yb[lo:hi], lam, cfg.label_smoothing)
                # Weight by the micro-batch's share so the gradient equals the full batch's mean.
                scaler.scale(loss * ((hi - lo) / n)).backward()
                total += loss.detach() * ((hi - lo) / n)
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if p.micro == 1:
                raise EngineError("out of memory even with micro-batch size 1: the model does not fit "
                                  f"on {device_info(device).name}") from None
            p.micro = max(1, p.micro // 2)
            emit(OomEvent(micro_batch_size=p.micro))
    if cfg.grad_clip_norm:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return total


# ----------------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_steps(s: Setup, p: Progress, epoch: int, t_epoch: float, emit: Callable[[Event], None]
               ) -> torch.Tensor:
    """The epoch's steps, until its end, divergence or the time budget; returns the summed loss."""
    cfg, budget = s.cfg, s.spec.budget
    loss_sum = torch.zeros((), device=s.device)
    perm = torch.randperm(len(s.train_y), generator=s.gen, device=s.device)
    progress_every = max(1, s.steps_per_epoch // 10)
    for i in range(s.steps_per_epoch):
        t_step = time.perf_counter()
        set_lr(s.optimizer, cfg.lr, lr_factor(p.step, s.total_steps, s.steps_per_epoch, cfg))
        loss = _train_step(s, p, perm[i * s.effective_batch:(i + 1) * s.effective_batch], emit)
        loss_sum += loss
        # Remember the first non-finite step on the device; reading it back waits for the next check.
        p.first_bad = torch.where((p.first_bad < 0) & ~torch.isfinite(loss), p.step + 1, p.first_bad)
        if s.ema is not None and p.step % cfg.ema_every == 0:
            s.ema.update()
        p.step += 1
        p.images_seen += s.effective_batch
        if cfg.compile and p.step == (p.resumed_at[1] if p.resumed_at else 0) + 1:  # this attempt compiles
            _sync(s.device)
            p.compile_seconds += time.perf_counter() - t_step
        if p.step % s.check_every == 0 or i == s.steps_per_epoch - 1:
            _sync(s.device)  # the clock below must include the queued GPU work
            bad = int(p.first_bad)
            if bad > 0:
                p.stop_reason, p.diverged_step = StopReason.diverged, bad
                p.diverged_epoch = (bad - 1) // s.steps_per_epoch + 1
                break
            elapsed = p.train_seconds + time.perf_counter() - t_epoch
            if cfg.compile and not budget.compile_counts:
                elapsed -= p.compile_seconds
            if budget.max_seconds is not None and elapsed >= budget.max_seconds:
                p.stop_reason = StopReason.time_budget
                break
        if p.step % progress_every == 0:
            rate = p.images_seen / max(p.train_seconds + time.perf_counter() - t_epoch, 1e-9)
            emit(ProgressEvent(epoch=epoch + 1, step=p.step, total_steps=s.total_steps, loss=float(loss),
                               lr=s.optimizer.param_groups[0]["lr"], images_per_sec=rate))
    return loss_sum


def _train_epoch(s: Setup, p: Progress, epoch: int, data: Dataset, emit: Callable[[Event], None]) -> None:
    s.model.train()
    t_epoch = time.perf_counter()
    loss_sum = _run_steps(s, p, epoch, t_epoch, emit)
    _sync(s.device)
    p.train_seconds += time.perf_counter() - t_epoch
    steps_this_epoch = p.step - epoch * s.steps_per_epoch
    p.last_loss = float(loss_sum) / max(steps_this_epoch, 1)
    if p.stop_reason == StopReason.diverged:
        return
    # A time budget can end an epoch early: its row is kept (marked partial), but only whole epochs count
    # as completed.
    partial = steps_this_epoch < s.steps_per_epoch
    if not partial:
        p.epochs_done = epoch + 1
    if s.swa is not None and epoch >= s.epochs - s.cfg.swa_epochs:
        s.swa.update_parameters(s.model)
    images_per_sec = steps_this_epoch * s.effective_batch / max(time.perf_counter() - t_epoch, 1e-9)
    test_accuracy = None
    if s.spec.eval_every_epoch:
        t_eval = time.perf_counter()
        logits = _predict(s, eval_model(s.model, s.ema, s.swa, final=False), data.test_x[s.public_idx], "none")
        test_accuracy = (logits.argmax(1) == data.test_y[s.public_idx]).float().mean().item()  # .item(): synced
        p.epoch_eval_seconds += time.perf_counter() - t_eval
    event = EpochEvent(epoch=epoch + 1, epochs=s.epochs, train_loss=p.last_loss, steps=steps_this_epoch,
                       partial=partial, lr=s.optimizer.param_groups[0]["lr"], seconds=p.train_seconds,
                       images_per_sec=images_per_sec, test_accuracy=test_accuracy)
    p.history.append(event.row())
    if s.checkpoint_dir is not None and not partial and (
            time.perf_counter() - p.checkpointed_at >= s.checkpoint_every or p.epochs_done == s.epochs):
        checkpoint.save_run(s, p)
        p.checkpointed_at = time.perf_counter()
    emit(event)


def _predict(s: Setup, model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    return predict_logits(model, x, EVAL_BATCH, device=s.device, mean=s.mean, std=s.std, tta=tta,
                          autocast_dtype=s.amp_dtype, channels_last=s.channels_last)


# ----------------------------------------------------------------------------------------------------
# Final evaluation
# ----------------------------------------------------------------------------------------------------


def _final_result(s: Setup, p: Progress, data: Dataset) -> TrainResult:
    t_eval = time.perf_counter()
    status = p.stop_reason.outcome
    metrics = logits16 = None
    if status == Outcome.succeeded:
        logits = _predict(s, eval_model(s.model, s.ema, s.swa, final=True), data.test_x, s.cfg.tta)
        metrics = Metrics.model_validate(
            evaluate_halves(logits, data.test_y, data.num_classes, s.public_idx, s.private_idx))
        logits16 = logits.half()
    _sync(s.device)
    eval_seconds = time.perf_counter() - t_eval + p.epoch_eval_seconds
    result = TrainResult(
        status=status, stop_reason=p.stop_reason,
        epochs_planned=s.epochs, epochs_completed=p.epochs_done,
        steps_completed=p.step, steps_planned=s.total_steps,
        diverged_step=p.diverged_step, diverged_epoch=p.diverged_epoch,
        train_loss_final=p.last_loss if p.last_loss == p.last_loss else None,
        micro_batch_size=p.micro, effective_batch_size=s.effective_batch,
        precision=s.precision, channels_last=s.channels_last, memory_format_note=s.memory_format_note,
        compile=CompileInfo(enabled=s.cfg.compile, seconds=p.compile_seconds, counted=s.spec.budget.compile_counts),
        history=p.history,
        accuracy=metrics.public.accuracy if metrics else None,
        private_accuracy=metrics.private.accuracy if metrics else None,
        metrics=metrics,
        evaluated_weights=weights_name(s.ema, s.swa) if metrics else None,
        images_per_sec=p.images_seen / p.train_seconds if p.train_seconds else None,
        timings=Timings(setup_seconds=s.setup_seconds, train_seconds=p.train_seconds, eval_seconds=eval_seconds,
                        epoch_eval_seconds=p.epoch_eval_seconds),
        # What the run cost, measured the same way on every worker: the training and evaluation phases, each
        # ending with the device synchronised; setup is not counted. train_seconds and epoch_eval_seconds
        # carry on from the checkpoint, so earlier attempts' work (up to their last checkpoint) is included.
        device_seconds=p.train_seconds + eval_seconds,
        resumed=None if p.resumed_at is None else Resumed(
            epochs=p.resumed_at[0], steps=p.resumed_at[1], earlier_attempt_seconds=p.earlier_attempt_seconds),
        device=device_info(s.device),
        peak_memory_bytes=peak_memory(s.device),
        versions=versions(),
        test_split=TestSplit(public=len(s.public_idx), private=len(s.private_idx)),
        dataset=DatasetInfo(source=data.source, content_hash=data.content_hash, train=len(s.train_y),
                            test=len(data.test_y), classes=data.classes),
        spec=s.spec,
    )
    labels = data.test_y.to("cpu", torch.int64) if logits16 is not None else None
    return result.with_logits(logits16, labels)

