"""`hparena`: train a config locally, run the API or a worker, or the whole demo on one machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker import student

if TYPE_CHECKING:  # the engine loads lazily: `hparena api` never imports torch
    from worker.engine.result import TrainResult

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="hparena: hyperparameter-tuning competitions on ResNet18/CIFAR-10.")
console = Console()
student.register(cli)  # login, submit, status, leaderboard, cancel: worker/student.py


def main() -> None:
    cli()


# ----------------------------------------------------------------------------------------------------
# hparena train: the engine, locally
# ----------------------------------------------------------------------------------------------------


def load_run_spec(path: Path, data: str | None, epochs: int | None):
    """A YAML/JSON file holding a RunSpec ({config, model, data, budget, seed}) or just hyperparameters."""
    import yaml
    from pydantic import ValidationError

    from worker.engine.config import RunSpec, TrainConfig

    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise typer.BadParameter(f"{path} must hold a mapping")
    if not set(raw) & set(RunSpec.model_fields) and set(raw) <= set(TrainConfig.model_fields):
        raw = {"config": raw}  # a bare hyperparameter file
    if data:
        raw.setdefault("data", {})["path"] = data
    if epochs:
        raw.setdefault("config", {})["epochs"] = epochs
        raw.setdefault("budget", {}).setdefault("max_epochs", max(epochs, 1))
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                 for err in e.errors()]
        raise typer.BadParameter(f"{path} is not a valid run config:\n" + "\n".join(lines)) from None


@cli.command()
def train(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML/JSON run config")],
    data: Annotated[str | None, typer.Option(help="Dataset path (image folder, tarball or CIFAR root)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    out: Annotated[Path, typer.Option(help="Where to write the result JSON")] = Path("result.json"),
    epochs: Annotated[int | None, typer.Option(help="Override config.epochs (and the budget cap)")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(
        help="Save each epoch's state here and resume from it when run again (removed once finished)")] = None,
) -> None:
    """Train one config with the same engine the workers use; writes the same result JSON they store."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from app.config import get_settings
    from worker.engine import checkpoint
    from worker.engine.data import DatasetError, load_dataset
    from worker.engine.result import EngineError, EpochEvent, Event, Outcome, ProgressEvent, ResumeEvent, SetupEvent
    from worker.engine.train import train as run_engine

    spec = load_run_spec(config, data, epochs)
    settings = get_settings()
    try:
        with console.status("Loading dataset..."):
            dataset = load_dataset(spec.data, settings.data_dir, download=settings.allow_download,
                                   default_path=settings.dataset_path)
    except DatasetError as e:
        console.print(f"[red]dataset error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"Data: {dataset.source}: {dataset.num_train} train / {dataset.num_test} test images")

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]}  {task.fields[ips]:.0f} img/s"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("setup", total=None, loss=float("nan"), acc="-", ips=0.0)

        def on_event(e: Event) -> None:
            if isinstance(e, ResumeEvent):
                progress.console.print(f"resumed from {checkpoint_dir}: {e.epochs_done} epoch(s) already trained")
                progress.update(bar, completed=e.steps_done)
            elif isinstance(e, SetupEvent):
                progress.update(bar, description=f"train on {e.device} ({e.precision})", total=e.total_steps)
            elif isinstance(e, ProgressEvent):
                progress.update(bar, completed=e.step, loss=e.loss, ips=e.images_per_sec)
            elif isinstance(e, EpochEvent):
                acc = "-" if e.test_accuracy is None else f"{e.test_accuracy:.3f}"
                loss = float("nan") if e.train_loss is None else e.train_loss
                progress.update(bar, acc=acc, loss=loss)
                progress.console.print(f"epoch {e.epoch}/{e.epochs}: loss {loss:.4f}, "
                                       f"public acc {acc}, {e.images_per_sec:.0f} img/s")

        try:
            result = run_engine(spec, dataset, device, on_event, checkpoint_dir=checkpoint_dir)
        except EngineError as e:
            console.print(f"[red]training failed:[/red] {e}")
            raise typer.Exit(1) from None
    out.write_text(json.dumps(result.to_json(), indent=2, allow_nan=False))
    if checkpoint_dir is not None:
        checkpoint.remove(checkpoint_dir)
    _print_summary(result)
    console.print(f"Result written to {out}")
    if result.status != Outcome.succeeded:
        raise typer.Exit(1)


def _print_summary(r: TrainResult) -> None:
    t = Table(title="Result", show_header=False)
    t.add_row("status", f"{r.status.value} ({r.stop_reason.value})")
    if r.metrics is not None:
        pub, priv = r.metrics.public, r.metrics.private
        t.add_row("accuracy (public half)", _fmt(pub.accuracy))
        t.add_row("accuracy (private half)", _fmt(priv.accuracy))
        t.add_row("ECE / after temperature", f"{_fmt(pub.ece)} / {_fmt(pub.ece_temperature)}")
    if r.diverged_step:
        t.add_row("diverged at", f"step {r.diverged_step} (epoch {r.diverged_epoch})")
    t.add_row("epochs", f"{r.epochs_completed}/{r.epochs_planned}")
    t.add_row("device", f"{r.device.name} ({r.precision})")
    t.add_row("device-seconds", f"{r.device_seconds:.1f}")
    if r.images_per_sec:
        t.add_row("images/s", f"{r.images_per_sec:.0f}")
    tm = r.timings
    t.add_row("setup / train / eval s", f"{tm.setup_seconds:.1f} / {tm.train_seconds:.1f} / {tm.eval_seconds:.1f}")
    console.print(t)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"  # None: an empty half of a tiny test set


# ----------------------------------------------------------------------------------------------------
# Services
# ----------------------------------------------------------------------------------------------------


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (alembic upgrade head)."""
    from app import migrate as m
    from app.config import get_settings

    m.upgrade()
    console.print(f"Database at head: {get_settings().database_url}")


@cli.command()
def api(host: str = "127.0.0.1", port: int = 8000,
        workers: int = typer.Option(1, min=1, help="API processes (uvicorn workers) sharing the port.")) -> None:
    """Run the REST API (uvicorn)."""
    from app import migrate as m
    from app.config import get_settings
    from app.serve import serve

    try:
        get_settings().admin_secret()
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    m.upgrade()
    serve(host, port, workers)


@cli.command()
def worker(
    hardware_class: Annotated[str | None, typer.Option(help="Queue train.<class> to consume")] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name")] = None,
) -> None:
    """Run one training worker (one process per GPU: start one per device)."""
    from app.config import get_settings

    hc = hardware_class or get_settings().hardware_class
    os.environ["HPARENA_HARDWARE_CLASS"] = hc
    get_settings.cache_clear()
    from worker.celery_app import celery

    argv = ["worker", "-Q", get_settings().queue_for(hc), "--concurrency", "1", "--pool", "prefork",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    # Unique per process by default: two workers on one host must never share a node name (the claim
    # treats a run "running on my hostname" as left behind by this worker's own dead child).
    argv += ["--hostname", hostname or f"{hc}-{os.getpid()}@%h"]
    celery.worker_main(argv)


@cli.command("prepare-data")
def prepare_data(
    image_size: Annotated[int, typer.Option(help="Pack at this size (a competition's data.image_size)")] = 32,
) -> None:
    """Pack the default CIFAR-10 into HPARENA_DATA_DIR unless it is there already (the image's entrypoint runs
    this before a worker starts, so the first run doesn't pay for it inside its time limit)."""
    from app.config import get_settings
    from worker.engine.config import DataSpec
    from worker.engine.data import DatasetError, load_dataset

    settings = get_settings()
    try:
        dataset = load_dataset(DataSpec(image_size=image_size), settings.data_dir, download=settings.allow_download,
                               default_path=settings.dataset_path)
    except DatasetError as e:
        console.print(f"[red]dataset error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"Data ready in {settings.data_dir}: {dataset.source}: "
                  f"{dataset.num_train} train / {dataset.num_test} test images")


# ----------------------------------------------------------------------------------------------------
# hparena demo: API + one worker on SQLite and the embedded broker
# ----------------------------------------------------------------------------------------------------


@cli.command()
def demo(
    port: int = 8000,
    entries: Annotated[int, typer.Option(help="Example configs to submit")] = 3,
    exit_when_done: Annotated[bool, typer.Option(help="Stop once every example is scored")] = False,
) -> None:
    """Start the API and a worker, create a demo competition, submit examples, watch the leaderboard."""
    from worker.demo import run_demo

    raise typer.Exit(run_demo(console, port=port, entries=entries, exit_when_done=exit_when_done))


if __name__ == "__main__":
    main()
