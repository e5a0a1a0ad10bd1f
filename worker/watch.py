"""`hparena submit --watch`: poll a submission until it is over, with a live display in a terminal and a line
for each change, and the words the student commands use for a submission's progress (queue position, ETA,
accuracy).

Polling rides out a server that is briefly unreachable (a restart) for UNREACHABLE_GIVE_UP_SECONDS.
"""

from __future__ import annotations

import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from worker.client import ArenaClient, SubmissionView, Unreachable, duration

TERMINAL = frozenset({"succeeded", "failed", "diverged", "cancelled"})
UNREACHABLE_GIVE_UP_SECONDS = 60.0  # --watch rides out a server restart shorter than this


# ----------------------------------------------------------------------------------------------------
# Progress in words
# ----------------------------------------------------------------------------------------------------


def acc_text(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def eta_text(sub: SubmissionView) -> str:
    if sub.eta_seconds is not None:
        return f"ETA {duration(sub.eta_seconds)}"
    # The note's first clause says why there is none ("no live worker serves cpu now"); the rest is arithmetic.
    return f"ETA unknown ({sub.eta_note.split(';')[0]})" if sub.eta_note else "ETA unknown"


def queue_line(sub: SubmissionView) -> str:
    p = sub.queue_position
    ahead = "next to start" if p == 0 else f"{p} run{'s' if p != 1 else ''} ahead"
    return f"queue position {p} ({ahead}), {eta_text(sub)}"


# ----------------------------------------------------------------------------------------------------
# The watch
# ----------------------------------------------------------------------------------------------------


class _News:
    """What the watch already printed, so each poll adds only what changed: queue moves, the start, epochs."""

    def __init__(self, first: SubmissionView) -> None:
        self.status, self.position = first.status, first.queue_position
        self.epochs: dict[int, int] = {}

    def lines(self, sub: SubmissionView) -> list[str]:
        lines = []
        if sub.status == "queued" and sub.queue_position != self.position:
            lines.append(f"queued: {queue_line(sub)}")
        if sub.status == "running" and self.status != "running":
            devices = sorted({r.device_name for r in sub.runs if r.device_name})
            lines.append("running" + (f" on {', '.join(devices)}" if devices else ""))
        planned = sub.planned_epochs
        for run in sub.runs:
            for e in run.epochs[self.epochs.get(run.id, 0):]:
                loss = "" if e.train_loss is None else f", train loss {e.train_loss:.3f}"
                lines.append(f"seed {run.seed}: epoch {e.epoch}/{planned or '?'}: public accuracy "
                             f"{acc_text(e.test_accuracy)}{loss}")
            self.epochs[run.id] = len(run.epochs)
        self.status, self.position = sub.status, sub.queue_position
        return lines


def _render(sub: SubmissionView) -> RenderableType:
    if sub.status == "queued":
        head = f"#{sub.id} queued: {queue_line(sub)}"
    else:
        head = f"#{sub.id} {sub.status}, {eta_text(sub)}"
    bars = Table.grid(padding=(0, 1))
    planned = sub.planned_epochs
    for run in sub.runs:
        done = len(run.epochs)
        total = planned or max(done, 1)
        latest = next((e.test_accuracy for e in reversed(run.epochs) if e.test_accuracy is not None), None)
        bars.add_row(f"seed {run.seed}", ProgressBar(total=total, completed=max(done, run.progress * total),
                                                     width=30),
                     f"{done}/{total} epochs", f"acc {acc_text(latest)}", run.status)
    return Group(Spinner("dots", text=Text(head)), bars)  # a str would be read as markup; eta_note is the server's


def watch_submission(api: ArenaClient, sub: SubmissionView, out: Console | None,
                     interval: float) -> SubmissionView:
    """Poll GET /api/submissions/{id} until it is over. With a console: a live display (in a terminal) and a
    line for each change (anywhere, so a log or a pipe sees the progress too)."""
    news = _News(sub)
    if out is None:
        while (sub := _poll(api, sub.id, interval)).status not in TERMINAL:
            time.sleep(interval)
        return sub
    with Live(console=out, refresh_per_second=8, transient=True) as live:
        while True:
            sub = _poll(api, sub.id, interval)
            for line in news.lines(sub):
                live.console.print(line, markup=False, soft_wrap=True)
            if sub.status in TERMINAL:
                return sub
            live.update(_render(sub))
            time.sleep(interval)


def _poll(api: ArenaClient, submission_id: int, interval: float) -> SubmissionView:
    since = time.monotonic()
    while True:
        try:
            return api.submission(submission_id)
        except Unreachable:
            if time.monotonic() - since > UNREACHABLE_GIVE_UP_SECONDS:
                raise
            time.sleep(max(interval, 1.0))
