"""Helpers shared by the benchmarks: where the data and the cache live, the real CIFAR-10 in both forms
(the engine's packed uint8 tensors and an unpacked JPEG image folder for torchvision's ImageFolder),
and small timing and printing utilities.

Both forms hold the same images: the packed dataset's `balanced_subset(n)` is the first n // 10 images
of every class in sorted file-name order, and `unpack_train_subset(n)` extracts exactly those files
(`check_same_images` verifies a few of them pixel by pixel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tarfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from worker.engine.config import DataSpec
from worker.engine.data import Dataset, load_dataset

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / "var" / "bench-cache"  # var/ is git-ignored
DEFAULT_TAR = Path(os.environ.get("HPARENA_DATASET_PATH") or REPO.parent / "shared" / "datasets"
                   / "cifar10-jpg.tar.gz")
NUM_CLASSES = 10


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in under a minute")
    p.add_argument("--data", type=Path, default=DEFAULT_TAR, help="the CIFAR-10 JPEG tarball")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="packed dataset and unpacked JPEGs")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    return p


def device_of(args: argparse.Namespace) -> torch.device:
    """The device the engine side runs on (the engine's own resolution: auto = CUDA when available)."""
    from worker.engine.device import resolve_device
    from worker.engine.result import EngineError

    try:
        return resolve_device(args.device)
    except (EngineError, RuntimeError) as e:
        raise SystemExit(f"--device {args.device}: {e}") from None


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it includes it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_note(device: torch.device) -> str:
    from worker.engine.device import device_info

    return f"{device} ({device_info(device).name})"


def setup_cpu(threads: int | None) -> int:
    """Torch's intra-op threads, and the engine's CPU allocator setting (`tune_cpu_allocator`, which
    `train()` applies itself) set up front, so that engine and baseline run under the same allocator."""
    from worker.engine.device import tune_cpu_allocator

    tune_cpu_allocator()
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_cifar(data: Path, cache_dir: Path, train_subset: int | None = None,
               test_subset: int | None = None) -> Dataset:
    """The real CIFAR-10 through the engine's own loader (packs the tarball into cache_dir once)."""
    if not data.exists():
        raise SystemExit(f"dataset {data} not found; pass --data or set HPARENA_DATASET_PATH")
    spec = DataSpec(name="cifar10", train_subset=train_subset, test_subset=test_subset)
    return load_dataset(spec, cache_dir, download=False, default_path=data)


def unpack_train_subset(data: Path, cache_dir: Path, n: int) -> Path:
    """Extract the first n // 10 training JPEGs of every class (sorted names) into an image folder, once.

    Returns the folder to hand to `torchvision.datasets.ImageFolder` (it holds `<class>/NNNN.jpg`).
    """
    per_class = n // NUM_CLASSES
    root = cache_dir / f"jpg-train-{per_class * NUM_CLASSES}"
    done = root / ".complete"
    if done.exists():
        return root
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(data, "r:*") as tf:
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for m in tf.getmembers():
            parts = PurePosixPath(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] == "train":
                by_class.setdefault(parts[-2], []).append(m)
        for cls, members in sorted(by_class.items()):
            (root / cls).mkdir(exist_ok=True)
            for m in sorted(members, key=lambda m: m.name)[:per_class]:
                f = tf.extractfile(m)
                assert f is not None
                (root / cls / PurePosixPath(m.name).name).write_bytes(f.read())
    done.write_text("ok\n")
    print(f"[setup] unpacked {per_class * NUM_CLASSES} training JPEGs into {root} "
          f"in {time.perf_counter() - t0:.1f}s")
    return root


def check_same_images(folder: Path, packed: Dataset, samples: int = 3) -> None:
    """Assert that the image folder and the packed subset hold the same pictures, in the same order."""
    files = sorted(folder.glob("*/*.jpg"), key=lambda p: (p.parent.name, p.name))
    if len(files) != packed.num_train:
        raise SystemExit(f"{folder} holds {len(files)} images but the packed subset {packed.num_train}")
    for i in np.linspace(0, len(files) - 1, samples * NUM_CLASSES).astype(int):
        with Image.open(files[i]) as im:
            pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        if not torch.equal(pixels, packed.train_x[i]):
            raise SystemExit(f"{files[i]} differs from packed image {i}: the two pipelines see other data")


def tutorial_transform(mean: Sequence[float], std: Sequence[float]):
    """The PIL pipeline as the PyTorch CIFAR-10 tutorials write it: the baseline both benches compare to."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table; floats get 3 significant decimals unless pre-formatted."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in cells]
    return "\n".join(out)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load_note() -> str:
    """The 1-minute load average next to the core count: how shared the CPU was while measuring."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unavailable"
    return f"1-min load average {load:.1f} on {os.cpu_count()} cores (other processes share them)"


# ---- a scratch PostgreSQL database, for the benches that need one ------------------------------------------

PG_ADMIN_URL = os.environ.get("HPARENA_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def create_pg_database(name: str) -> str:
    """A fresh, empty database `name` on the server at HPARENA_BENCH_PG: its URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(name: str) -> None:
    """Drop it, closing this process's pool to it first."""
    from sqlalchemy import create_engine, text

    from app.db import close_engine

    close_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def bulk_teams(s, comp, n: int, prefix: str) -> list[tuple[int, int]]:
    """n teams of competition `comp` with one participant each, inserted in bulk through session `s`, whose
    tokens are f"bench-{prefix}-{i}"; -> [(team_id, user_id)]."""
    import uuid

    from sqlalchemy import insert

    from app.auth.models import Role, User
    from app.auth.service import hash_token
    from app.competitions.models import Membership, Team
    from app.db import utcnow
    from app.names import name_key

    now = utcnow()
    user_ids = s.scalars(insert(User).returning(User.id, sort_by_parameter_order=True), [
        {"name": f"{prefix}-{i}", "role": Role.participant, "token_hash": hash_token(f"bench-{prefix}-{i}"),
         "created_at": now} for i in range(n)]).all()
    team_ids = s.scalars(insert(Team).returning(Team.id, sort_by_parameter_order=True), [
        {"competition_id": comp.id, "name": f"{prefix} team {i}", "name_key": name_key(f"{prefix} team {i}"),
         "invite_code": uuid.uuid4().hex, "created_at": now} for i in range(n)]).all()
    s.execute(insert(Membership), [{"user_id": u, "team_id": t, "competition_id": comp.id, "created_at": now}
                                   for u, t in zip(user_ids, team_ids, strict=True)])
    return list(zip(team_ids, user_ids, strict=True))
