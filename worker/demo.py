"""`hparena demo`: the whole system on one machine, with no external services.

SQLite in var/, kombu's filesystem broker in var/broker, the API (uvicorn) and one Celery worker as
real processes. It creates a small competition on real CIFAR-10 (a subset, a narrow ResNet18, so each
entry trains in about a minute on 2 CPU cores), submits a few example configs and shows the
leaderboard filling in.
"""

from __future__ import annotations

import time

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from app.config import get_settings

DEMO_SLUG = "cifar10-demo"
DEMO_COMPETITION = {
    "slug": DEMO_SLUG,
    "title": "CIFAR-10 demo: ResNet18 (width 16) on 5,000 images, 6 epochs",
    "dataset": {"name": "cifar10", "image_size": 32, "train_subset": 5000, "test_subset": 1000},
    "model": {"arch": "resnet18", "width": 16},
    "budget": {"max_epochs": 6, "max_seconds": 240},
    "hardware_class": "cpu",
    "search_space": {
        "lr": {"min": 0.0001, "max": 2.0},
        "batch_size": {"choices": [32, 64, 128, 256]},
        "optimizer": {"choices": ["sgd", "adam", "adamw"]},
    },
    "submission_quota": 20,
    "quota_window_hours": 24,
    "seeds": [0],
}
EXAMPLES = [
    ("ada", "team-onecycle", {"optimizer": "sgd", "lr": 0.2, "batch_size": 128, "schedule": "onecycle",
                              "label_smoothing": 0.1}),
    ("ben", "team-adam", {"optimizer": "adam", "lr": 0.002, "batch_size": 128, "schedule": "cosine",
                          "weight_decay": 0.0}),
    ("cy", "team-tiny-lr", {"optimizer": "sgd", "lr": 0.005, "batch_size": 64, "schedule": "constant"}),
    ("dee", "team-ema", {"optimizer": "sgd", "lr": 0.1, "batch_size": 64, "ema_decay": 0.99, "tta": "flip"}),
]


def run_demo(console: Console, *, port: int, entries: int, exit_when_done: bool) -> int:
    from app import migrate
    from worker.processes import python_cmd, spawn, stop, wait_http

    settings = get_settings()
    base = f"http://127.0.0.1:{port}"
    logs = settings.var_dir / "logs"
    console.print(f"[bold]hparena demo[/bold]: database {settings.database_url}, broker {settings.broker_url}")
    console.print(f"CIFAR-10 from: {settings.dataset_path or 'torchvision download into ' + str(settings.data_dir)}")
    migrate.upgrade()
    procs = [
        spawn(python_cmd("uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)), logs / "api.log"),
        spawn(python_cmd("worker.cli", "worker", "--hostname", "demo-worker@%h"), logs / "worker.log"),
    ]
    try:
        wait_http(f"{base}/api/health")
        admin = {"Authorization": f"Bearer {settings.admin_token}"}
        with httpx.Client(base_url=base, timeout=30) as http:
            submitted = _setup(http, admin, entries, console)
            console.print(f"\nBoard (live): {base}/competitions/{DEMO_SLUG}\nInsights:     {base}/competitions/"
                          f"{DEMO_SLUG}/insights\nAdmin:        {base}/admin (sign in at {base}/login with the "
                          f"admin token)\nAPI docs:     {base}/docs\nMetrics:      {base}/metrics\nLogs:         "
                          f"{logs}/\n", markup=False)
            console.print("Submit your own (join first, then use the token it returns):\n"
                          f"  curl -s -X POST {base}/api/competitions/{DEMO_SLUG}/join -H 'Content-Type: "
                          "application/json' -d '{\"name\": \"me\", \"team\": \"my-team\"}'\n"
                          f"  .venv/bin/hparena login {base} TOKEN\n"
                          "  echo 'lr: 0.1' > my.yaml\n"
                          f"  .venv/bin/hparena submit my.yaml --competition {DEMO_SLUG} --watch\n", markup=False)
            return _watch(http, admin, submitted, console, exit_when_done, procs)
    finally:
        for p in procs:
            stop(p)


def _setup(http: httpx.Client, admin: dict, entries: int, console: Console) -> list[tuple[dict, int]]:
    r = http.post("/api/admin/users", json={"name": "demo-organizer", "role": "organizer"}, headers=admin)
    r.raise_for_status()
    organizer = {"Authorization": f"Bearer {r.json()['token']}"}
    r = http.post("/api/competitions", json=DEMO_COMPETITION, headers=organizer)
    if r.status_code not in (201, 409):  # 409: an earlier demo created it; reuse
        r.raise_for_status()
    submitted = []
    for name, team, config in EXAMPLES[:entries]:
        j = http.post(f"/api/competitions/{DEMO_SLUG}/join", json={"name": name, "team": team})
        if j.status_code == 403:  # an earlier demo run made this team: start a fresh one beside it
            team = f"{team}-{int(time.time()) % 100000}"
            j = http.post(f"/api/competitions/{DEMO_SLUG}/join", json={"name": name, "team": team})
        j.raise_for_status()
        headers = {"Authorization": f"Bearer {j.json()['token']}"}
        s = http.post(f"/api/competitions/{DEMO_SLUG}/submissions", json={"config": config}, headers=headers)
        s.raise_for_status()
        submitted.append((headers, s.json()["id"]))
        console.print(f"submitted #{s.json()['id']} for {j.json()['team']}: {config}")
    return submitted


def _watch(http, admin, submitted, console, exit_when_done, procs) -> int:
    t0 = time.time()
    done_at: dict[int, float] = {}
    with Live(console=console, refresh_per_second=1) as live:
        while True:
            if any(p.poll() is not None for p in procs):
                console.print("[red]the API or the worker exited; see var/logs/[/red]")
                return 1
            subs = []
            for headers, sid in submitted:
                d = http.get(f"/api/submissions/{sid}", headers=headers).json()
                subs.append(d)
                if d["status"] in ("succeeded", "failed", "diverged", "cancelled") and sid not in done_at:
                    done_at[sid] = time.time() - t0
            board = http.get(f"/api/competitions/{DEMO_SLUG}/leaderboard").json()
            fleet = http.get("/api/admin/workers", headers=admin).json()
            live.update(Group(_board_table(board), _subs_table(subs, done_at), _fleet_line(fleet)))
            if exit_when_done and len(done_at) == len(submitted):
                break
            time.sleep(2)
    for sid, secs in sorted(done_at.items()):
        console.print(f"submission #{sid}: submit -> result in {secs:.0f} s")
    return 0


def _board_table(board: dict) -> Table:
    t = Table(title=f"Leaderboard: {board['title']} (rank bands: {board['bands']['test']}, "
                    f"alpha {board['bands']['alpha']})")
    unit = board.get("cost_unit", "gpu-hours")  # cpu-hours on a CPU class
    for col in ("rank", "team", "accuracy", "ECE", unit, "Pareto", "submissions", "best at"):
        t.add_column(col)
    for e in board["entries"]:
        # "2=": shares band 2 with another entry; its place inside the band is a tie-break, not significant.
        rank = "-" if e["rank"] is None else f"{e['rank']}{'=' if e['tie'] else ''}"
        acc = f"{e['accuracy']:.4f}" + (f" ± {e['accuracy_std']:.4f}" if e["accuracy_std"] is not None else "")
        t.add_row(rank, e["team"] + (" (baseline)" if e["baseline"] else ""), acc,
                  "-" if e["ece"] is None else f"{e['ece']:.3f}", f"{(e['gpu_hours'] or 0):.5f}",
                  "*" if e["pareto"] else "", str(e["submissions"]), e["best_at"][11:19])
    return t


def _subs_table(subs: list[dict], done_at: dict[int, float]) -> Table:
    t = Table(title="Demo submissions")
    for col in ("id", "status", "progress", "epoch curve (public acc)", "device", "error"):
        t.add_column(col)
    for d in subs:
        run = d["runs"][0] if d["runs"] else {}
        curve = " ".join(f"{e['test_accuracy']:.2f}" for e in run.get("epochs", []) if e["test_accuracy"] is not None)
        t.add_row(str(d["id"]), d["status"], f"{run.get('progress', 0):.0%}", curve or "-",
                  run.get("device_name") or "-", (d.get("error") or "")[:60])
    return t


def _fleet_line(fleet: dict) -> Table:
    t = Table(title="Workers")
    for col in ("hostname", "state", "device", "queued runs"):
        t.add_column(col)
    queued = sum(q["queued_runs"] for q in fleet["queues"])
    for w in fleet["workers"]:
        t.add_row(w["hostname"], w["state"], w["device_name"] or "-", str(queued))
    return t
