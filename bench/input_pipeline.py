"""Input pipeline: batches/s of the engine's on-device augmentation vs a tutorial torchvision DataLoader.

Engine: the training images are one packed uint8 tensor (N, 3, 32, 32) in memory. A batch is drawn by
index from a random permutation, normalized on the device and augmented in a few batched kernels with
`augment_batch` (reflect-pad 4 + random crop, horizontal flip, cutout 8), then laid out channels_last,
exactly as `worker.engine.train` does it before the forward pass.

Baseline: the tutorial recipe, `torchvision.datasets.ImageFolder` over the same images as JPEG files,
`transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(...)])`,
`DataLoader(batch_size=256, shuffle=True, num_workers=2)`. Every sample is decoded from JPEG and
transformed with PIL on every epoch: that is the cost the packed format removes.

Why it is fair:
- Same pictures: the image folder is unpacked from the same tarball the engine packs, and the engine
  draws from the same class-balanced subset (the script checks a few images pixel by pixel).
- Same batch size, same output: a normalized float batch of 256 plus its labels.
- Same CPU: the engine uses torch's intra-op threads (2 here), the loader 2 worker processes.
- The engine does strictly more work per image (cutout and the channels_last copy on top), so the
  ratio understates its advantage.
- Both sides get warm-up batches that are not timed (worker start-up, first allocations), and the
  measurement alternates engine and baseline rounds so that load from other processes hits both; the
  ratio of the per-side medians is reported.
"""

from __future__ import annotations

import time

import _common as c
import torch
import torchvision
from torch.utils.data import DataLoader

from worker.engine.augment import augment_batch, cutout, normalize, random_crop
from worker.engine.config import TrainConfig
from worker.engine.train import channel_stats

TARGET = 20.0


def main() -> None:
    p = c.base_parser(__doc__)
    p.add_argument("--train-images", type=int, default=10_000, help="class-balanced subset, both pipelines")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (baseline)")
    p.add_argument("--engine-batches", type=int, default=300, help="timed engine batches per round")
    p.add_argument("--baseline-batches", type=int, default=30, help="timed DataLoader batches per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches before each timed round")
    p.add_argument("--rounds", type=int, default=7, help="alternating engine/baseline rounds")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.engine_batches, args.baseline_batches, args.rounds = 2560, 50, 8, 2
    threads = default_threads = c.setup_cpu(args.threads)
    device = c.device_of(args)
    on_cpu = device.type == "cpu"

    # ---- the same images in both forms --------------------------------------------------------------
    data = c.load_cifar(args.data, args.cache_dir, train_subset=args.train_images, test_subset=10)
    folder = c.unpack_train_subset(args.data, args.cache_dir, args.train_images)
    c.check_same_images(folder, data)
    n = data.num_train
    per_epoch = n // args.batch_size
    if args.warmup + args.baseline_batches > per_epoch:
        args.baseline_batches = per_epoch - args.warmup
        print(f"[note] a DataLoader epoch has {per_epoch} batches: timing {args.baseline_batches} per round")

    # ---- engine: index into the packed tensor, normalize and augment in batched kernels ----------------
    cfg = TrainConfig(crop_padding=4, flip=True, cutout_size=8)
    mean, std = channel_stats(data.train_x)
    gen = torch.Generator(device=device).manual_seed(0)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)  # as train() holds them
    state = {"perm": torch.randperm(n, generator=gen, device=device), "pos": 0}

    def engine_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if state["pos"] + args.batch_size > n:  # a new epoch: a new permutation, as the engine does
            state["perm"], state["pos"] = torch.randperm(n, generator=gen, device=device), 0
        idx = state["perm"][state["pos"]:state["pos"] + args.batch_size]
        state["pos"] += args.batch_size
        x = augment_batch(train_x.index_select(0, idx), cfg, gen, mean=mean, std=std)  # exactly the engine's call
        return x.contiguous(memory_format=torch.channels_last), train_y.index_select(0, idx)

    def time_engine(threads: int) -> float:
        torch.set_num_threads(threads)
        try:
            for _ in range(args.warmup):
                engine_batch()
            c.sync(device)
            t0 = time.perf_counter()
            for _ in range(args.engine_batches):
                engine_batch()
            c.sync(device)
            return args.engine_batches / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(default_threads)

    # ---- baseline: the tutorial DataLoader over JPEG files --------------------------------------------
    tutorial = c.tutorial_transform(mean, std)
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=tutorial)
    assert dataset.classes == data.classes, (dataset.classes, data.classes)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)

    def time_baseline() -> tuple[float, float]:
        t_start = time.perf_counter()
        it = iter(loader)  # starts the worker processes
        for _ in range(args.warmup):
            next(it)
        t_first = time.perf_counter() - t_start
        t0 = time.perf_counter()
        for _ in range(args.baseline_batches):
            x, y = next(it)
            if not on_cpu:  # the tutorial loop's .to(device): the batch must end up where the engine's is
                x, y = x.to(device), y.to(device)
        c.sync(device)
        rate = args.baseline_batches / (time.perf_counter() - t0)
        del it  # shuts the workers down before the next engine round
        return rate, t_first

    # ---- measure, alternating ---------------------------------------------------------------------------
    print(f"input pipeline: {n} real CIFAR-10 training images, batch {args.batch_size}, engine on "
          f"{c.device_note(device)}, {threads} torch threads, {args.workers} DataLoader workers; {c.load_note()}")
    # The engine also runs with 1 intra-op thread, for information only: on a shared 2-core machine an
    # OpenMP team of 2 waits on whichever thread the OS has descheduled, so 1 thread can win.
    rows, eng, base = [], [], []
    for r in range(args.rounds):
        e = time_engine(threads)
        e1 = time_engine(1) if on_cpu else float("nan")  # intra-op threads only matter on the CPU
        b, startup = time_baseline()
        eng.append(e)
        base.append(b)
        rows.append([r + 1, e, e * args.batch_size, e1, b, b * args.batch_size, startup, e / b])
        print(f"  round {r + 1}/{args.rounds}: engine {e:.1f} batches/s, baseline {b:.2f} batches/s",
              flush=True)

    print()
    print(c.table(["round", "engine batch/s", "engine img/s", "engine 1-thread batch/s", "baseline batch/s",
                   "baseline img/s", "loader warm-up s", "ratio"], rows))
    e_med, b_med = c.median(eng), c.median(base)
    print()
    print(f"engine:   {e_med:9.1f} batches/s  ({e_med * args.batch_size:10,.0f} images/s)  "
          f"index + normalize + crop/flip/cutout + channels_last")
    print(f"baseline: {b_med:9.2f} batches/s  ({b_med * args.batch_size:10,.0f} images/s)  "
          f"ImageFolder + PIL crop/flip + ToTensor + Normalize, {args.workers} workers")
    print(f"(each side: median of {args.rounds} rounds; {c.load_note()})")

    # ---- where the engine's time goes: the same steps augment_batch runs for this config, timed apart --
    phases = {"index (uint8 index_select)": 0.0, "crop pad 4 + flip (uint8)": 0.0, "cutout 8 (uint8)": 0.0,
              "to float + normalize": 0.0, "channels_last copy": 0.0}
    fill = torch.tensor([round(255 * v) for v in mean], dtype=torch.uint8, device=device).view(1, -1, 1, 1)
    names = list(phases)
    steps = max(args.engine_batches // 2, 10)

    def now() -> float:
        c.sync(device)  # on CUDA each phase is timed to its completion
        return time.perf_counter()

    for _ in range(steps):
        idx = torch.randperm(n, generator=gen, device=device)[:args.batch_size]
        t = [now()]
        xb = train_x.index_select(0, idx)
        t.append(now())
        xb = random_crop(xb, cfg.crop_padding, gen, flip_p=0.5)
        t.append(now())
        xb = cutout(xb, cfg.cutout_size, cfg.cutout_prob, gen, fill=fill)
        t.append(now())
        x = normalize(xb, mean, std)
        t.append(now())
        x.contiguous(memory_format=torch.channels_last)
        t.append(now())
        for i, name in enumerate(names):
            phases[name] += t[i + 1] - t[i]
    total = sum(phases.values())
    print()
    print(f"engine batch, phase by phase ({steps} batches, ms per batch of {args.batch_size}):")
    print(c.table(["phase", "ms/batch", "share"],
                  [[k, 1000 * v / steps, f"{100 * v / total:.0f}%"] for k, v in phases.items()]
                  + [["total", 1000 * total / steps, "100%"]]))
    ratio = e_med / b_med
    print(f"RATIO engine/baseline = {ratio:.1f}x (target >= {TARGET:.0f}x): {c.verdict(ratio >= TARGET)}")


if __name__ == "__main__":
    main()
