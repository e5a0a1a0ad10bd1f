"""The train task: claim -> prepare -> run the engine -> report -> clean up.

A thin shell around the engine. The claim hands over the run's stored RunSpec, the only thing the worker
knows about the competition. Everything the engine learns flows back through typed events; the database
sees epoch rows while training runs and one final write (`result_columns`) when it ends.

A failed run says whose doing it was (FailureKind), which decides who pays: the engine's EngineError
carries its kind, a run past its time limit is a timeout, and anything else (the dataset unreadable, the
disk, the database, a bug of ours) is the infrastructure's: retried while attempts are left, then refunded.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, WorkerLostError
from billiard.pool import SIG_SOFT_TIMEOUT
from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.request import Request
from sqlalchemy.exc import OperationalError

from app.admin.models import HardwareClass
from app.admin.service import upsert_node
from app.config import get_settings
from app.db import session_scope
from app.dispatch import deployment_uid
from app.hardware import check_result, class_of_queue, get_class, thread_share
from app.queue import TRAIN_TASK
from app.submissions import runs
from app.submissions.limits import TimeLimits, time_limits
from app.submissions.models import FailureKind, Run, RunStatus
from worker.celery_app import celery, hardware_problem
from worker.engine.config import DataSpec
from worker.engine.result import (
    EngineError,
    EpochEvent,
    Event,
    Outcome,
    ProgressEvent,
    ResumeEvent,
    SetupEvent,
    StopRequested,
    TrainResult,
)

log = logging.getLogger("hparena.worker")


def _dataset(spec: DataSpec):
    return _cached_dataset(spec.model_dump_json())  # the JSON is the cache key: the model is mutable


@lru_cache(maxsize=2)
def _cached_dataset(spec_json: str):
    """Packed datasets are cached on disk; this keeps the last ones in the worker process as well."""
    from worker.engine.data import load_dataset

    s = get_settings()
    return load_dataset(DataSpec.model_validate_json(spec_json), s.data_dir, download=s.allow_download,
                        default_path=s.dataset_path)


def _drop_checkpoint(directory: Path) -> None:
    from worker.engine import checkpoint  # torch: imported in the child only

    try:
        checkpoint.remove(directory)
    except OSError:  # a leftover file costs disk, not correctness: the next run of this id checks identity
        log.exception("could not remove the checkpoint %s", directory)


def result_columns(result: TrainResult, hardware: HardwareClass | None, class_name: str) -> dict[str, Any]:
    """The one mapping from the engine's result onto the run's row: the record itself, its indexed copies
    (see app.submissions.models.Run), why its device is not its competition's class `class_name` (whose
    row is `hardware`) if it is not, and, for a diverged run, the reason in words. `logits` and `labels` are
    not columns: runs.finish stores them (RunLogits, TestLabels)."""
    metrics = result.metrics
    fields: dict[str, Any] = dict(
        result=result.to_json(), gpu_seconds=result.device_seconds, stop_reason=result.stop_reason.value,
        device_name=result.device.name, precision=result.precision,
        setup_seconds=result.timings.setup_seconds, accuracy=result.accuracy, private_accuracy=result.private_accuracy,
        ece=metrics.public.ece if metrics else None, private_ece=metrics.private.ece if metrics else None,
        diverged_epoch=result.diverged_epoch, diverged_step=result.diverged_step, logits=result.logits,
        labels=result.labels, device_mismatch=check_result(hardware, class_name, result),
    )
    if result.status == Outcome.diverged:
        fields["error"] = f"loss became NaN/inf at step {result.diverged_step} (epoch {result.diverged_epoch})"
    return fields


class _Heartbeat(threading.Thread):
    """Refreshes the run's heartbeat while training; notices when the run stops being this worker's
    (cancelled by the participant, or superseded by another attempt) and asks the engine to stop.

    It is also the run's watchdog, for it keeps running when training hangs. Past the soft limit it sets
    `timed_out` (the engine's next event raises SoftTimeLimitExceeded) and, when the task runs on the main
    thread, interrupts it with SIGUSR1, which breaks a blocking read as well (`interrupt_with`). If the run
    is still not over `grace` seconds later (stuck in native code, where no Python handler runs), it writes
    the timeout itself and, in a pool child, kills its own process (`hard_kill`); Celery's parent starts a
    new child, and the requeued token is an empty claim or the next run.
    """

    def __init__(self, claim: runs.Claimed, interval: float, limits: TimeLimits, started: float,
                 hard_kill: bool):
        super().__init__(name=f"heartbeat-run-{claim.run_id}", daemon=True)
        self.claim, self.interval, self.limits, self.started = claim, interval, limits, started
        self.hard_kill = hard_kill
        self.progress = 0.0
        self.device_name: str | None = None
        self.stop_requested = threading.Event()
        self.stopped_because = "cancelled"  # or runs.SUPERSEDED: what the last beat found
        self.timed_out = threading.Event()  # the soft limit passed while the run was training
        self.armed = True  # cleared by disarm(): training is over, the soft limit no longer applies
        self._target: int | None = None  # the thread SIGUSR1 interrupts
        self._lock = threading.Lock()
        self._done = threading.Event()

    def interrupt_with(self, thread_id: int) -> None:
        """Past the soft limit, send SIGUSR1 to this thread (the main thread, which runs the handler)."""
        self._target = thread_id

    def run(self) -> None:
        soft_at, hard_at = self.started + self.limits.soft_seconds, self.started + self.limits.hard_seconds
        next_beat = time.perf_counter() + self.interval
        while True:
            now = time.perf_counter()
            if not self.timed_out.is_set() and now >= soft_at:
                if not self._soft_limit():  # training was over in time: nothing left to watch
                    soft_at = float("inf")
            elif self.timed_out.is_set() and now >= hard_at:
                self._hard_limit()
                hard_at = float("inf")
            if now >= next_beat:
                self.beat()
                next_beat = now + self.interval
            deadline = min(next_beat, hard_at if self.timed_out.is_set() else soft_at)
            if self._done.wait(max(0.0, deadline - time.perf_counter())):
                return

    def beat(self) -> None:
        try:
            with session_scope() as s:
                status = runs.heartbeat(s, self.claim, self.progress, self.device_name)
            if status != RunStatus.running:
                self.stopped_because = status
                self.stop_requested.set()
        except Exception:  # a missed beat is not fatal; the stale window is many beats long
            log.exception("heartbeat failed for run %s", self.claim.run_id)

    def disarm(self) -> bool:
        """Training is over (its result is in, or it raised): no soft signal from now on, so that none breaks
        the report. Returns whether the soft limit passed before."""
        with self._lock:
            self.armed = False
            return self.timed_out.is_set()

    def _soft_limit(self) -> bool:
        with self._lock:  # disarm() and this are one or the other: a signal goes only to a training run
            if not self.armed:
                return False
            self.timed_out.set()
            log.warning("run %s: %s; stopping it", self.claim.run_id, self.limits.exceeded())
            if self._target is not None:
                signal.pthread_kill(self._target, SIG_SOFT_TIMEOUT)
            return True

    def _hard_limit(self) -> None:
        if not self.hard_kill:  # run in the caller's process (`apply`): killing it would kill the caller
            log.error("run %s: still not over %g s past its time limit", self.claim.run_id,
                      self.limits.hard_seconds - self.limits.soft_seconds)
            return
        log.error("run %s: still not over %g s past its time limit, stuck where no signal reaches it; "
                  "writing its timeout and killing this process", self.claim.run_id,
                  self.limits.hard_seconds - self.limits.soft_seconds)
        try:
            with session_scope() as s:
                runs.finish(s, self.claim, RunStatus.failed, failure_kind=FailureKind.timeout,
                            error=f"{self.limits.exceeded()}; it did not stop, so its process was killed",
                            wall_seconds=time.perf_counter() - self.started)
        except Exception:  # the run stays running: the parent records a lost child, the retry takes it
            log.exception("could not record the timeout of run %s", self.claim.run_id)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self._done.set()


def _die_loudly_on_native_crashes() -> None:
    """In the pool child, before training: a native crash must end the process with its signal, after
    printing the Python stacks to the worker log (sys.stderr is Celery's logging proxy; __stderr__ the log).

    billiard's child handles SIGABRT in Python (a clean exit, code 70), which hides the cause and runs
    cleanup code on a heap that glibc just found corrupt. Reset it here, after billiard installed its
    handlers; faulthandler then dumps the stacks and re-raises each fatal signal with the default action.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGABRT, signal.SIG_DFL)
        faulthandler.enable(file=sys.__stderr__, all_threads=True)


def lost_child_reason(pool_message: str, hostname: str) -> str:
    """billiard's "Worker exited prematurely: signal 6 (SIGABRT) Job: 2." in words a participant can read."""
    m = re.search(r"signal (\d+) \((SIG\w+)\)", pool_message)
    if m is None:
        how = pool_message.split(":", 1)[-1].split(" Job:")[0].strip() or "unknown cause"
        return f"the training process on {hostname} exited unexpectedly ({how})"
    name = m.group(2)
    why = {"SIGKILL": "killed, usually by the system's out-of-memory killer",
           "SIGABRT": "aborted by native code (glibc or a library found its memory corrupt)",
           "SIGSEGV": "crashed in native code (invalid memory access)",
           "SIGBUS": "crashed in native code (bus error)", "SIGILL": "crashed in native code (illegal instruction)",
           "SIGFPE": "crashed in native code (arithmetic fault)"}.get(name, "killed by a signal")
    return f"the training process on {hostname} was {why}: signal {m.group(1)} ({name})"


def shutting_down() -> bool:
    """In the worker's parent: a SIGTERM (warm) or SIGQUIT (cold) shutdown has begun. Celery's signal handler
    only sets these flags; its consumer notices them at the next turn of its loop, and on the embedded
    broker that turn can take seconds, during which a message is still delivered."""
    # Each flag holds the exit code once set, and 0 (EX_OK) counts: compare by identity, as Celery does.
    return any(flag is not None and flag is not False
               for flag in (worker_state.should_stop, worker_state.should_terminate))


class TrainRequest(Request):
    """Runs in the worker's parent process, which outlives a child that crashes in native code."""

    def revoked(self):
        """Called by the parent just before it hands a message to the pool. A token that arrives once a
        shutdown has begun goes back to the queue instead, for another worker: draining a node must not
        start a run that its termination grace period may cut short. (Without this, the run that finished
        during the shutdown freed the prefetch slot, and the loop's last poll trained the next run.)"""
        if super().revoked():
            return True
        if not shutting_down():
            return False
        log.info("token %s arrived during the worker's shutdown: back to the queue", self.id)
        self._already_revoked = True  # so that Celery skips it (execute_using_pool raises TaskRevokedError)
        worker_state.task_ready(self)
        self.reject(requeue=True)
        return True

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback wraps what the pool saw
        cancelled = getattr(self, "_already_cancelled", False) or getattr(self, "_already_revoked", False)
        if isinstance(exc, WorkerLostError | SystemExit) and not cancelled:
            # A SIGSEGV/SIGABRT (a oneDNN or CUDA fault), or the kernel's OOM killer: the child can't
            # report it, so the parent writes it on the run before the token is requeued. The retry
            # retakes the run; after the last attempt the run fails with this text as its reason.
            reason = lost_child_reason(str(exc), self.hostname)
            try:
                with session_scope() as s:
                    lost = runs.record_lost_child(s, self.hostname, reason)
                log.error("run %s: %s", ",".join(map(str, lost)) or "(none claimed)", reason)
            except Exception:
                log.exception("could not record the lost child (%s)", reason)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class TrainTask(celery.Task):
    Request = TrainRequest


class WrongDeployment(Exception):
    """A token from another deployment: this worker's database is not the one that queued the run."""


def _refuse(hostname: str, queue: str, theirs: str, ours: str, delay: float) -> None:
    problem = (f"refused a message from deployment {theirs}: this worker's database is deployment {ours}. "
               "Point the worker at the database of the API that queues its runs (HPARENA_DATABASE_URL), "
               "or give each deployment its own broker or hardware class.")
    log.error("%s (%s)", problem, hostname)
    try:
        with session_scope() as s:
            upsert_node(s, hostname, queue, problem=problem)
    except Exception:
        log.exception("could not record the refusal on the fleet table")
    time.sleep(delay)  # the message goes back to the queue: don't take it again at once


def _stop_on_soft_limit(hb: _Heartbeat) -> Callable[[], None]:
    """While `hb` is armed, SIGUSR1 raises SoftTimeLimitExceeded in this thread; returns what undoes that.

    billiard's own handler in a pool child does the same, unconditionally: this one ignores a signal that
    lands after training ended (`hb.disarm`), so that it can't break the report. Off the main thread (a
    caller's `apply` in a thread of its own) no handler can run there: the engine's events, which check
    `hb.timed_out`, are then the only way to stop the run.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def raise_soft(_signum, _frame):
        if hb.armed:
            raise SoftTimeLimitExceeded(hb.limits.exceeded())

    previous = signal.signal(SIG_SOFT_TIMEOUT, raise_soft)
    hb.interrupt_with(threading.get_ident())
    return lambda: signal.signal(SIG_SOFT_TIMEOUT, signal.SIG_DFL if previous is None else previous)


def _record_failure(exc: Exception, claim: runs.Claimed, *, timed_out: bool, limits: TimeLimits, ckpt: Path,
                    wall_seconds: float, max_attempts: int) -> str:
    """Every failure leaves the run saying why, and whose doing it was: a timeout when the limit passed
    (whatever was raised then: the signal may surface wrapped), the EngineError's own kind, else the
    infrastructure's, which retries the run while it has attempts left."""
    if timed_out:
        kind, text = FailureKind.timeout, limits.exceeded()
    elif isinstance(exc, EngineError):
        kind, text = FailureKind(exc.kind), str(exc)
    else:  # not the run's doing: the dataset unreadable, the disk, the database, a bug of ours
        kind, text = FailureKind.infrastructure, f"{type(exc).__name__}: {exc}"
    log.error("run %s failed (%s): %s\n%s", claim.run_id, kind.value, text, traceback.format_exc())
    try:
        with session_scope() as s:
            if kind == FailureKind.infrastructure:
                outcome = runs.retry(s, claim, text, max_attempts=max_attempts, wall_seconds=wall_seconds)
            else:
                outcome = runs.finish(s, claim, RunStatus.failed, failure_kind=kind, error=text[:4000],
                                      wall_seconds=wall_seconds) or RunStatus.failed
    except Exception:
        log.exception("could not record the failure of run %s", claim.run_id)
        raise  # the run stays running; the sweep requeues it, and the retry resumes from the checkpoint
    if outcome not in (runs.SUPERSEDED, RunStatus.queued):  # over: nothing will resume it
        _drop_checkpoint(ckpt)
    if outcome == RunStatus.queued:
        return "requeued"
    return kind.value if outcome == RunStatus.failed and kind == FailureKind.timeout else outcome


@celery.task(name=TRAIN_TASK, bind=True, base=TrainTask)
def train_run(self, deployment: str | None = None) -> str:
    """One wake-up token (app.dispatch): claim the fairest queued run of this worker's queue and train it."""
    settings = get_settings()
    hostname = self.request.hostname or f"local@{socket.gethostname()}"
    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or settings.queue_for(settings.hardware_class)
    if hardware_problem() is not None:  # the start-up check refused this device: leave the token for another
        raise Reject(hardware_problem(), requeue=True)

    # ---- claim ----------------------------------------------------------------------------------------
    try:
        with session_scope() as s:
            ours = deployment_uid(s)
            if deployment is not None and deployment != ours:
                raise WrongDeployment(ours)
            claim = runs.claim_next(s, queue, hostname, stale_after=settings.stale_after_seconds,
                                    max_attempts=settings.max_attempts)
            if isinstance(claim, runs.Claimed):  # a token names no run: its limits are known only now
                limits = time_limits(s.get(Run, claim.run_id).predicted_seconds, claim.spec.budget, settings)
    except WrongDeployment:
        _refuse(hostname, queue, deployment, ours, settings.refuse_delay_seconds)
        raise Reject(f"message of deployment {deployment}", requeue=True) from None
    except OperationalError as e:
        # The database is unreachable or locked. The token goes (a retry held by this worker would be one
        # the reconciler can't see, and it would send another): once the database is back, the
        # reconciler tops the broker up to one token per queued run again.
        log.warning("database unavailable at claim (%s); dropping the token for the reconciler", e)
        time.sleep(1)
        return "skipped: database unavailable"
    if not isinstance(claim, runs.Claimed):
        log.info("token on %s: %s", queue, claim)
        return f"skipped: {claim}"
    run_id = claim.run_id

    if not self.request.is_eager:  # in a pool child, not in a caller's process (tests, `apply`)
        _die_loudly_on_native_crashes()
    t0 = time.perf_counter()
    hb = _Heartbeat(claim, settings.heartbeat_seconds, limits, started=t0, hard_kill=not self.request.is_eager)
    restore_signal = _stop_on_soft_limit(hb)
    ckpt = runs.checkpoint_dir(settings.checkpoint_dir, run_id)  # shared by every attempt of this run
    try:
        # ---- prepare ------------------------------------------------------------------------------------
        # Imported here, in the child: the parent process never loads CUDA.
        import torch

        from worker.engine.device import device_info, resolve_device
        from worker.engine.train import train

        threads = thread_share(settings.worker_threads)
        torch.set_num_threads(threads)  # this worker's share of the node's cores, not all of them
        device = resolve_device(settings.device)
        hb.device_name = device_info(device).name
        with session_scope() as s:
            upsert_node(s, hostname, queue, current_run_id=run_id, device_name=hb.device_name, problem=None,
                        threads=threads)
            hardware = get_class(s, class_of_queue(queue))  # the competition's class: its runs' queue
        hb.start()
        hb.beat()
        data = _dataset(claim.spec.data)

        def on_event(event: Event) -> None:
            if isinstance(event, ResumeEvent):  # the claim cleared the curve; the checkpoint's epochs stand
                with session_scope() as s:
                    for row in event.history:
                        hb.progress = row.epoch / row.epochs
                        runs.record_epoch(s, claim, row, hb.progress)
            elif isinstance(event, SetupEvent):
                with session_scope() as s:
                    runs.record_setup(s, claim, event.precision, event.setup_seconds)
            elif isinstance(event, ProgressEvent):
                hb.progress = event.fraction
            elif isinstance(event, EpochEvent):
                hb.progress = event.fraction
                with session_scope() as s:
                    runs.record_epoch(s, claim, event, hb.progress)
            if hb.stop_requested.is_set():
                raise StopRequested
            if hb.timed_out.is_set():  # the watchdog's signal may not reach this thread (see _Heartbeat)
                raise SoftTimeLimitExceeded(limits.exceeded())

        # ---- run ------------------------------------------------------------------------------------------
        result = train(claim.spec, data, device, on_event, checkpoint_dir=ckpt,
                       checkpoint_every_seconds=settings.checkpoint_seconds)

        # ---- report ---------------------------------------------------------------------------------------
        if hb.disarm():  # the limit passed as training ended: a timeout, as for any run past it
            raise SoftTimeLimitExceeded(limits.exceeded())
        if result.status == Outcome.cancelled:
            # The participant's cancel (or the attempt that superseded this one) already wrote the run's
            # state; this worker writes nothing more. A superseding attempt may be resuming from the
            # checkpoint: only a cancelled run's is dropped.
            if hb.stopped_because == RunStatus.cancelled:
                _drop_checkpoint(ckpt)
            return hb.stopped_because
        with session_scope() as s:
            not_ours = runs.finish(s, claim, RunStatus(result.status.value),
                                   **result_columns(result, hardware, class_of_queue(queue)),
                                   wall_seconds=time.perf_counter() - t0)
        if not_ours != runs.SUPERSEDED:
            _drop_checkpoint(ckpt)  # the run is over: nothing will resume it
        return not_ours or result.status.value
    except Exception as exc:
        try:
            timed_out = hb.disarm()
        except SoftTimeLimitExceeded:  # the watchdog's signal, landing just as this other failure did
            timed_out = True
        return _record_failure(exc, claim, timed_out=timed_out, limits=limits, ckpt=ckpt,
                               wall_seconds=time.perf_counter() - t0, max_attempts=settings.max_attempts)
    finally:
        # ---- clean up -------------------------------------------------------------------------------------
        hb.close()
        restore_signal()
        try:
            with session_scope() as s:
                upsert_node(s, hostname, queue, current_run_id=None)
        except Exception:
            log.exception("could not mark worker idle")
        try:
            import torch

            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:
            pass
