"""The train task: claim -> prepare -> run the engine -> report -> clean up.

A thin shell around the engine. The claim hands over the run's stored RunSpec, the only thing the worker
knows about the competition. Everything the engine learns flows back through typed events; the database
sees epoch rows while training runs and one final write (`result_columns`) when it ends.
"""

from __future__ import annotations

import faulthandler
import logging
import re
import signal
import socket
import sys
import threading
import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import Reject
from celery.worker.request import Request
from sqlalchemy.exc import OperationalError

from app.admin.service import upsert_node
from app.config import get_settings
from app.db import session_scope
from app.dispatch import deployment_uid
from app.queue import TRAIN_TASK
from app.submissions import runs
from app.submissions.models import RunStatus
from worker.celery_app import celery
from worker.engine.config import DataSpec
from worker.engine.result import (
    EngineError,
    EpochEvent,
    Event,
    Outcome,
    ProgressEvent,
    ResumeEvent,
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


def result_columns(result: TrainResult) -> dict[str, Any]:
    """The one mapping from the engine's result onto the run's row: the record itself, its indexed copies
    (see app.submissions.models.Run) and, for a diverged run, the reason in words."""
    fields: dict[str, Any] = dict(
        result=result.to_json(), gpu_seconds=result.device_seconds, stop_reason=result.stop_reason.value,
        device_name=result.device.name, accuracy=result.accuracy, private_accuracy=result.private_accuracy,
        diverged_epoch=result.diverged_epoch, diverged_step=result.diverged_step, logits=result.logits,
    )
    if result.status == Outcome.diverged:
        fields["error"] = f"loss became NaN/inf at step {result.diverged_step} (epoch {result.diverged_epoch})"
    return fields


class _Heartbeat(threading.Thread):
    """Refreshes the run's heartbeat while training; notices when the run stops being this worker's
    (cancelled by the participant, or superseded by another attempt) and asks the engine to stop."""

    def __init__(self, claim: runs.Claimed, interval: float):
        super().__init__(name=f"heartbeat-run-{claim.run_id}", daemon=True)
        self.claim, self.interval = claim, interval
        self.progress = 0.0
        self.device_name: str | None = None
        self.stop_requested = threading.Event()
        self.stopped_because = "cancelled"  # or runs.SUPERSEDED: what the last beat found
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        try:
            with session_scope() as s:
                status = runs.heartbeat(s, self.claim, self.progress, self.device_name)
            if status != RunStatus.running:
                self.stopped_because = status
                self.stop_requested.set()
        except Exception:  # a missed beat is not fatal; the stale window is many beats long
            log.exception("heartbeat failed for run %s", self.claim.run_id)

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


class TrainRequest(Request):
    """Runs in the worker's parent process, which outlives a child that crashes in native code."""

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


@celery.task(name=TRAIN_TASK, bind=True, base=TrainTask)
def train_run(self, deployment: str | None = None) -> str:
    """One wake-up token (app.dispatch): claim the fairest queued run of this worker's queue and train it."""
    settings = get_settings()
    hostname = self.request.hostname or f"local@{socket.gethostname()}"
    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or settings.queue_for(settings.hardware_class)

    # ---- claim ----------------------------------------------------------------------------------------
    try:
        with session_scope() as s:
            ours = deployment_uid(s)
            if deployment is not None and deployment != ours:
                raise WrongDeployment(ours)
            claim = runs.claim_next(s, queue, hostname, stale_after=settings.stale_after_seconds,
                                    max_attempts=settings.max_attempts)
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
    hb = _Heartbeat(claim, settings.heartbeat_seconds)
    ckpt = runs.checkpoint_dir(settings.checkpoint_dir, run_id)  # shared by every attempt of this run
    t0 = time.perf_counter()
    try:
        # ---- prepare ------------------------------------------------------------------------------------
        # Imported here, in the child: the parent process never loads CUDA.
        from worker.engine.device import device_info, resolve_device
        from worker.engine.train import train

        device = resolve_device(settings.device)
        hb.device_name = device_info(device).name
        with session_scope() as s:
            upsert_node(s, hostname, queue, current_run_id=run_id, device_name=hb.device_name, problem=None)
        hb.start()
        hb.beat()
        data = _dataset(claim.spec.data)

        def on_event(event: Event) -> None:
            if isinstance(event, ResumeEvent):  # the claim cleared the curve; the checkpoint's epochs stand
                with session_scope() as s:
                    for row in event.history:
                        hb.progress = row.epoch / row.epochs
                        runs.record_epoch(s, claim, row, hb.progress)
            elif isinstance(event, ProgressEvent):
                hb.progress = event.fraction
            elif isinstance(event, EpochEvent):
                hb.progress = event.fraction
                with session_scope() as s:
                    runs.record_epoch(s, claim, event, hb.progress)
            if hb.stop_requested.is_set():
                raise StopRequested

        # ---- run ------------------------------------------------------------------------------------------
        result = train(claim.spec, data, device, on_event, checkpoint_dir=ckpt,
                       checkpoint_every_seconds=settings.checkpoint_seconds)

        # ---- report ---------------------------------------------------------------------------------------
        if result.status == Outcome.cancelled:
            # The participant's cancel (or the attempt that superseded this one) already wrote the run's
            # state; this worker writes nothing more. A superseding attempt may be resuming from the
            # checkpoint: only a cancelled run's is dropped.
            if hb.stopped_because == RunStatus.cancelled:
                _drop_checkpoint(ckpt)
            return hb.stopped_because
        with session_scope() as s:
            not_ours = runs.finish(s, claim, RunStatus(result.status.value), **result_columns(result),
                                   wall_seconds=time.perf_counter() - t0)
        if not_ours != runs.SUPERSEDED:
            _drop_checkpoint(ckpt)  # the run is over: nothing will resume it
        return not_ours or result.status.value
    except Exception as exc:
        # Every failure leaves the run saying why.
        text = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
        log.error("run %s failed: %s\n%s", run_id, text, traceback.format_exc())
        try:
            with session_scope() as s:
                not_ours = runs.finish(s, claim, RunStatus.failed, error=text[:4000],
                                       wall_seconds=time.perf_counter() - t0)
        except Exception:
            log.exception("could not record the failure of run %s", run_id)
            raise  # the run stays running; the sweep requeues it, and the retry resumes from the checkpoint
        if not_ours != runs.SUPERSEDED:
            _drop_checkpoint(ckpt)
        return not_ours or "failed"
    finally:
        # ---- clean up -------------------------------------------------------------------------------------
        hb.close()
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
