"""`GET /metrics`: the service in Prometheus text format, for a scraper inside the cluster.

Two kinds of figures:
- What the database knows (queues, runs by state, run duration, device-seconds and images/s, the workers'
  heartbeats) is computed when scraped, by `DatabaseCollector`, with SQL aggregates (a histogram is one
  grouped query). Every API process reads the same rows, so any of them reports the same truth, and no
  count drifts across processes or restarts. The run histograms cover every finished run still in the
  database: they only grow, except when a competition is deleted with its runs (a counter reset to
  Prometheus).
- API request latency is observed by each process as it serves (`RequestLatency`). Several API processes
  (`hparena api --workers N`) share it through prometheus-client's multiprocess mode: set
  PROMETHEUS_MULTIPROC_DIR to an empty directory, before the API starts, and any process's scrape sums all
  of them.

Nothing here names a team, a user or a config, and no accuracy is exported (the private half's would leak
before close). The endpoint is open, as scrape targets usually are; keep it inside the cluster (or deny
/metrics at the ingress) where the API is public.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from datetime import datetime
from time import perf_counter

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.admin.models import WorkerNode
from app.db import session_scope, utcnow
from app.hardware import class_of_queue
from app.queue import queue_depth
from app.submissions.models import TERMINAL, Run, RunStatus

log = logging.getLogger(__name__)

# Run wall time and device-seconds: from a few seconds (a smoke test on CPU) to a 12 h budget.
SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200)
# Training images/s: a CPU worker trains hundreds, an H100 tens of thousands.
IMAGES_PER_SECOND_BUCKETS = (10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
UNROUTED = "<unrouted>"  # the route label of a request no route handled (raw paths are unbounded)


# ----------------------------------------------------------------------------------------------------
# Scrape-time figures from the database
# ----------------------------------------------------------------------------------------------------


class DatabaseCollector:
    """The families the database answers, computed at each scrape."""

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("hparena_database_up", "1 when the database answered this scrape's queries, else 0.")
        families: list[Metric] = []
        try:
            with session_scope() as s:
                families = _database_families(s, utcnow())
        except SQLAlchemyError:  # the latency figures are still worth serving
            log.warning("metrics: the database did not answer; its families are left out", exc_info=True)
        up.add_metric([], 1 if families else 0)
        return [up, *families]


def _database_families(s: Session, now: datetime) -> list[Metric]:
    by_queue_state = s.execute(select(Run.queue, Run.status, func.count()).group_by(Run.queue, Run.status)).all()
    workers = list(s.scalars(select(WorkerNode).order_by(WorkerNode.hostname)))
    served = {q for w in workers for q in w.queues.split(",") if q}
    queues = sorted({q for q, _, _ in by_queue_state} | served)
    finished = (Run.status.in_(TERMINAL), Run.reused_from_run_id.is_(None))  # a reused result trained nothing
    return [
        *_queues(queues, served, by_queue_state),
        _runs_by_state(queues, by_queue_state),
        _histogram(s, "hparena_run_duration_seconds",
                   "Wall seconds of finished runs, claim to finish (the worker's clock), by final state.",
                   Run.wall_seconds, SECONDS_BUCKETS, finished),
        _histogram(s, "hparena_run_device_seconds",
                   "Device-seconds of finished runs (GPU-seconds on a GPU class, CPU-seconds on a CPU class: "
                   "training and evaluation, every attempt), by final state.",
                   Run.gpu_seconds, SECONDS_BUCKETS, finished),
        _histogram(s, "hparena_run_images_per_second",
                   "Training images/s of succeeded runs, as the engine measured them.",
                   Run.result["images_per_sec"].as_float(), IMAGES_PER_SECOND_BUCKETS,
                   (Run.status == RunStatus.succeeded, *finished[1:]), by_state=False),
        _run_heartbeats(s, now),
        *_workers(workers, now),
    ]


def _queues(queues: list[str], served: set[str], by_queue_state) -> list[Metric]:
    labels = ["queue", "hardware_class"]
    depth = GaugeMetricFamily("hparena_queue_depth", "Runs waiting to be trained (queued in the database).",
                              labels=labels)
    broker = GaugeMetricFamily("hparena_queue_broker_messages",
                               "Messages waiting in the broker's queue, not counting those a worker holds, for "
                               "queues in use (a worker serves it, or runs are queued or running on it); left "
                               "out when the broker can't be reached.", labels=labels)
    queued = {q: n for q, state, n in by_queue_state if state == RunStatus.queued}
    # The broker is asked about the queues in use (as the admin fleet view does), not every class's in history.
    active = {q for q, state, _ in by_queue_state if state in (RunStatus.queued, RunStatus.running)} | served
    broker_up = True
    for q in queues:
        depth.add_metric([q, class_of_queue(q)], queued.get(q, 0))
        if q not in active:
            continue
        # One quick try per queue (app.queue.queue_depth); a broker that is down is not asked again.
        messages = queue_depth(q) if broker_up else None
        broker_up = messages is not None
        if messages is not None:
            broker.add_metric([q, class_of_queue(q)], messages)
    return [depth, broker]


def _runs_by_state(queues: list[str], by_queue_state) -> Metric:
    runs = GaugeMetricFamily("hparena_runs", "Runs in the database by state.", labels=["state", "hardware_class"])
    counts = {(q, state): n for q, state, n in by_queue_state}
    for q in queues:
        for state in RunStatus:  # every state, zeros too, so that a series does not vanish when it empties
            runs.add_metric([state.value, class_of_queue(q)], counts.get((q, state), 0))
    return runs


def _histogram(s: Session, name: str, doc: str, value: ColumnElement, buckets: tuple[float, ...],
               where: tuple[ColumnElement[bool], ...], *, by_state: bool = True) -> Metric:
    """One grouped query: per class (and state), the count, the sum, and how many are <= each bound, which
    are Prometheus's cumulative buckets."""
    by = [Run.queue, Run.status] if by_state else [Run.queue]
    rows = s.execute(select(*by, func.count(), func.sum(value),
                            *(func.sum(case((value <= b, 1), else_=0)) for b in buckets))
                     .where(value.is_not(None), *where).group_by(*by).order_by(*by)).all()
    family = HistogramMetricFamily(name, doc, labels=["hardware_class", "state"] if by_state else ["hardware_class"])
    for row in rows:
        labels, (count, total, *cumulative) = row[:len(by)], row[len(by):]
        family.add_metric([class_of_queue(labels[0]), *labels[1:]],
                          [*zip(map(floatToGoString, buckets), cumulative, strict=True), ("+Inf", count)], total)
    return family


def _run_heartbeats(s: Session, now: datetime) -> Metric:
    age = GaugeMetricFamily("hparena_run_heartbeat_age_max_seconds",
                            "Age of the oldest heartbeat among running runs: past HPARENA_STALE_AFTER_SECONDS a "
                            "run is presumed dead and swept back.", labels=["hardware_class"])
    for queue, oldest in s.execute(select(Run.queue, func.min(Run.heartbeat_at))
                                   .where(Run.status == RunStatus.running, Run.heartbeat_at.is_not(None))
                                   .group_by(Run.queue).order_by(Run.queue)):
        age.add_metric([class_of_queue(queue)], max((now - oldest).total_seconds(), 0.0))
    return age


def _workers(workers: list[WorkerNode], now: datetime) -> list[Metric]:
    labels = ["hostname", "hardware_class"]
    age = GaugeMetricFamily("hparena_worker_heartbeat_age_seconds",
                            "Seconds since each worker last reported (every HPARENA_SWEEP_SECONDS while alive).",
                            labels=labels)
    busy = GaugeMetricFamily("hparena_worker_busy", "1 while the worker holds a run, else 0.", labels=labels)
    for w in workers:
        first_queue = next((q for q in w.queues.split(",") if q), "")
        values = [w.hostname, w.hardware_class or class_of_queue(first_queue)]
        age.add_metric(values, max((now - w.last_seen).total_seconds(), 0.0))
        busy.add_metric(values, 1 if w.current_run_id is not None else 0)
    return [age, busy]


# ----------------------------------------------------------------------------------------------------
# Per-process request latency
# ----------------------------------------------------------------------------------------------------


class RequestLatency:
    """Times every HTTP request, from its arrival to its last byte, by method, route template and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram):
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = perf_counter(), 500  # an exception before the response starts becomes a 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.histogram.labels(scope["method"], route_template(scope), str(status)).observe(
                perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The route's path template (`/api/submissions/{submission_id}`), never the raw path, so the label's
    values are bounded by the routes. A request no route handled is UNROUTED: nothing matched its path (404),
    or it was refused before routing (413 from the body limit; the status label tells which)."""
    return getattr(scope.get("route"), "path", None) or UNROUTED


# ----------------------------------------------------------------------------------------------------
# Mounting
# ----------------------------------------------------------------------------------------------------


def mount(app: FastAPI) -> None:
    """Add the latency middleware and `GET /metrics` (left out of the OpenAPI document) to `app`.

    Each app has its own registry (not prometheus-client's global one), so that building many apps in one
    process (the tests) registers nothing twice. With PROMETHEUS_MULTIPROC_DIR set, the latency histogram
    lives in that directory's files, one per process, and the scrape merges them all."""
    registry = CollectorRegistry()
    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    latency = Histogram("hparena_http_request_duration_seconds",
                        "API request latency, arrival to last byte, by method, route template and status.",
                        ["method", "route", "status"], registry=None if multiprocess else registry)
    if multiprocess:
        MultiProcessCollector(registry)
    registry.register(DatabaseCollector())
    app.add_middleware(RequestLatency, histogram=latency)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        # The format the scraper asks for (OpenMetrics, or text); the classic text format 0.0.4 otherwise.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)
