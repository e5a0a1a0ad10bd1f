"""Fixed overhead per task: what a run pays before its first useful step, against what it buys.

(a) Dataset: loading the packed CIFAR-10 (all 60,000 images; `load_dataset` on a warm cache: hash the
    tarball, memory-map the packed file, then touch every byte so nothing is left lazy) vs decoding the
    60,000 JPEGs, i.e. the packing itself (`pack_source` into a fresh temporary cache directory, once).
    Target: the packed load under 1 s. With --images N < 60000, both sides use a class-balanced N-image
    tarball cut from the real one (the decode on it is then proportionally shorter).

(b) Setup vs training: the engine's per-task overhead (dataset load from the packed cache, the engine's
    setup as it reports it in result.timings.setup_seconds — device, statistics, model build,
    optimizer — and the first optimizer step) vs the training time of the demo competition's budget.
    The demo competition is imported from worker/demo.py (DEMO_COMPETITION: its dataset subset, model
    and budget; the config is its first example submission), exactly as the worker builds a RunSpec
    from them. Everything is measured cold, in this fresh process, like a worker's first task. The
    first step is timed from the engine's own progress events (one per step on the demo's 19-step
    epochs). Target: overhead under 5% of the training time.

Why it is fair: both sides of (a) produce the same uint8 tensors from the same tarball; in (b) the
overhead and the training time come from the same train() call.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

import _common as c
import torch

from worker.engine.config import Budget, DataSpec, ModelSpec, RunSpec, TrainConfig
from worker.engine.data import load_dataset
from worker.engine.packing import pack_source
from worker.engine.result import Event, ProgressEvent, SetupEvent
from worker.engine.train import train

LOAD_TARGET_S = 1.0
SETUP_TARGET = 0.05
FULL = 60_000

# Used only if worker/demo.py cannot be imported: the numbers the project brief gives.
FALLBACK_DEMO = {"dataset": {"name": "cifar10", "image_size": 32, "train_subset": 5000, "test_subset": 1000},
                 "model": {"arch": "resnet18", "width": 16}, "budget": {"max_epochs": 2}}
FALLBACK_CONFIG = {"batch_size": 128, "epochs": 2}


def main() -> None:
    p = c.base_parser(__doc__)
    p.add_argument("--images", type=int, default=FULL, help="images for part (a); 60000 = the whole tarball")
    p.add_argument("--load-repeats", type=int, default=5, help="packed loads to time (median reported)")
    p.add_argument("--train-subset", type=int, default=None, help="override the demo's training subset")
    p.add_argument("--test-subset", type=int, default=None, help="override the demo's test subset")
    p.add_argument("--max-epochs", type=int, default=None, help="override the demo's epoch budget")
    args = p.parse_args()
    if args.quick:
        args.images, args.load_repeats, args.max_epochs = 6000, 3, 1
    threads = c.setup_cpu(args.threads)
    print(f"overhead: {c.device_note(c.device_of(args))}, {threads} torch threads; {c.load_note()}")

    demo = demo_part(args)  # first, while the process is cold, as a worker's first task would be
    load_s, decode_s, n = dataset_part(args)

    print()
    ratio = decode_s / load_s
    print(f"RATIO decode/packed-load = {ratio:.0f}x (packed load of {n:,} images {load_s:.3f} s, "
          f"target < {LOAD_TARGET_S:.0f} s): {c.verdict(load_s < LOAD_TARGET_S)}")
    share = demo["overhead"] / demo["train_seconds"]
    print(f"RATIO setup/training = {100 * share:.1f}% (setup {demo['overhead']:.2f} s vs "
          f"{demo['train_seconds']:.1f} s of training, target < {100 * SETUP_TARGET:.0f}%): "
          f"{c.verdict(share < SETUP_TARGET)}")


# ----------------------------------------------------------------------------------------------------
# (b) setup vs the demo competition's training time
# ----------------------------------------------------------------------------------------------------


def demo_spec(args) -> tuple[RunSpec, str]:
    try:
        from worker.demo import DEMO_COMPETITION, EXAMPLES

        comp, config = DEMO_COMPETITION, EXAMPLES[0][2]
        origin = "worker/demo.py (DEMO_COMPETITION, config of EXAMPLES[0])"
    except Exception as e:  # noqa: BLE001 - any import problem means: use the documented numbers
        comp, config = FALLBACK_DEMO, FALLBACK_CONFIG
        origin = f"the brief's numbers (worker.demo not importable: {type(e).__name__}: {e})"
    data = dict(comp["dataset"])
    budget = dict(comp["budget"])
    if args.train_subset:
        data["train_subset"] = args.train_subset
    if args.test_subset:
        data["test_subset"] = args.test_subset
    if args.max_epochs:
        budget["max_epochs"] = args.max_epochs
    if args.quick or args.train_subset or args.test_subset or args.max_epochs:
        origin += " with --quick/override sizes"
    spec = RunSpec(config=TrainConfig.model_validate(config), model=ModelSpec.model_validate(comp["model"]),
                   data=DataSpec.model_validate(data), budget=Budget.model_validate(budget))
    return spec, origin


def demo_part(args) -> dict:
    spec, origin = demo_spec(args)
    print(f"(b) demo competition from {origin}:")
    print(f"    width {spec.model.width}, {spec.data.train_subset} train / {spec.data.test_subset} test "
          f"images, budget {spec.budget.max_epochs} epochs / {spec.budget.max_seconds} s, config "
          f"{spec.config.model_dump(exclude_defaults=True)}")

    t0 = time.perf_counter()
    data = load_dataset(spec.data, args.cache_dir, download=False, default_path=args.data)
    load_s = time.perf_counter() - t0

    marks: list[tuple[float, Event]] = []
    device = c.device_of(args)
    result = train(spec, data, device, on_event=lambda e: marks.append((time.perf_counter(), e)))
    t_setup = next(t for t, e in marks if isinstance(e, SetupEvent))
    progress = [(t, e) for t, e in marks if isinstance(e, ProgressEvent)]
    # Steady step time: median over consecutive progress events within one epoch (no evaluation between).
    pairs = zip(progress, progress[1:], strict=False)
    per_step = [(t2 - t1) / (e2.step - e1.step) for (t1, e1), (t2, e2) in pairs if e1.epoch == e2.epoch]
    steady = c.median(per_step)
    t_k, e_k = progress[0]
    first_step = (t_k - t_setup) - (e_k.step - 1) * steady  # exact when progress comes every step
    setup_s = result.timings.setup_seconds
    warmup = first_step - steady
    overhead = load_s + setup_s + first_step
    train_s = result.timings.train_seconds
    parts = [
        ("dataset load (packed cache, subset)", load_s),
        ("engine setup (result setup_seconds)", setup_s),
        ("first optimizer step", first_step),
        ("  of which above a steady step (warm-up)", warmup),
        ("overhead = load + setup + first step", overhead),
        ("  the same with only the warm-up part", load_s + setup_s + warmup),
        ("training (result train_seconds)", train_s),
    ]
    rows = [[name, sec, f"{100 * sec / train_s:.2f}%"] for name, sec in parts]
    rows.append(["evaluation, for reference (eval_seconds)", result.timings.eval_seconds, "-"])
    print(c.table(["part of the task", "seconds", "of training"], rows))
    steps = result.steps_completed
    if steps < 40:
        print(f"    note: with only {steps} steps, the first step alone is {100 / steps:.0f}% of training; the "
              "warm-up line is the fixed cost.")
    accuracy = float("nan") if result.accuracy is None else result.accuracy
    print(f"    {steps} steps of batch {result.effective_batch_size}, steady step {1000 * steady:.0f} ms, "
          f"{result.images_per_sec or 0:.0f} images/s, stop reason {result.stop_reason.value}, "
          f"public accuracy {accuracy:.3f}")
    return {"overhead": overhead, "train_seconds": train_s}


# ----------------------------------------------------------------------------------------------------
# (a) packed load vs JPEG decode
# ----------------------------------------------------------------------------------------------------


def subset_tarball(data: Path, cache_dir: Path, n: int) -> Path:
    """A class-balanced n-image cut of the real tarball (5/6 train, 1/6 test, like CIFAR-10), made once."""
    n_test = max(n // 6 // c.NUM_CLASSES, 1) * c.NUM_CLASSES
    n_train = max((n - n_test) // c.NUM_CLASSES, 1) * c.NUM_CLASSES
    out = cache_dir / f"cifar10-subset-{n_train}-{n_test}.tar.gz"
    if out.exists():
        return out
    want = {"train": n_train // c.NUM_CLASSES, "test": n_test // c.NUM_CLASSES}
    tmp = out.with_suffix(".tmp")
    with tarfile.open(data, "r:*") as src, tarfile.open(tmp, "w:gz") as dst:
        picked: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in src.getmembers():
            parts = PurePosixPath(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] in want:
                picked.setdefault((parts[-3], parts[-2]), []).append(m)
        for (split, _cls), members in sorted(picked.items()):
            for m in sorted(members, key=lambda m: m.name)[:want[split]]:
                dst.addfile(m, src.extractfile(m))
    tmp.replace(out)
    return out


def dataset_part(args) -> tuple[float, float, int]:
    source = args.data if args.images >= FULL else subset_tarball(args.data, args.cache_dir, args.images)
    spec = DataSpec(name="imagefolder", path=str(source))
    pack_source(source, spec.image_size, args.cache_dir)  # make sure the cache holds it (untimed)

    loads, touches = [], []
    n = 0
    for _ in range(args.load_repeats):
        t0 = time.perf_counter()
        ds = load_dataset(spec, args.cache_dir, download=False)
        t1 = time.perf_counter()
        checksum = int(ds.train_x.sum()) + int(ds.test_x.sum())  # page in every byte of the mapped file
        t2 = time.perf_counter()
        assert checksum > 0
        n = ds.num_train + ds.num_test
        loads.append(t1 - t0)
        touches.append(t2 - t0)
        del ds

    decode_dir = Path(tempfile.mkdtemp(prefix="decode-", dir=args.cache_dir))
    try:
        t0 = time.perf_counter()
        packed = pack_source(source, spec.image_size, decode_dir)
        decode_s = time.perf_counter() - t0
        size_mb = packed.stat().st_size / 1e6
    finally:
        shutil.rmtree(decode_dir, ignore_errors=True)

    load_s = c.median(touches)
    print()
    print(f"(a) dataset: {n:,} real CIFAR-10 images from {source.name} ({size_mb:.0f} MB packed), "
          f"{torch.get_num_threads()} torch threads")
    print(c.table(["path", "seconds", "images/s"], [
        ["packed load: load_dataset (hash + mmap), median", c.median(loads), f"{n / c.median(loads):,.0f}"],
        ["packed load + touch every byte, median", load_s, f"{n / load_s:,.0f}"],
        ["  first of those (cold in this process)", touches[0], f"{n / touches[0]:,.0f}"],
        ["decode JPEGs and pack (pack_source, fresh dir)", decode_s, f"{n / decode_s:,.0f}"],
    ]))
    return load_s, decode_s, n


if __name__ == "__main__":
    main()
