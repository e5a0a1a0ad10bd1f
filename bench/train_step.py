"""Training throughput: images/s of a full engine epoch vs a plain tutorial training loop, and where the
time goes in each.

Engine: `worker.engine.train.train()` on a class-balanced subset of the real CIFAR-10 (width-16
ResNet18, batch 256, its default recipe: nesterov SGD, one-cycle, crop + flip on the device,
channels_last, automatic precision: bf16 autocast on a CPU with native bf16, else fp32),
`eval_every_epoch=False`, `tta="none"`. Each round also runs the engine with `precision="fp32"`, so
the gain from the loop alone (no mixed precision) is printed next to the headline ratio. Images/s is the engine's own
`TrainResult.images_per_sec`: images trained / training seconds (setup and the final evaluation are
not included; the first step's warm-up is).

Baseline: the loop tutorials write. `DataLoader(ImageFolder(jpegs, RandomCrop(32, 4) + flip +
ToTensor + Normalize), batch_size=256, shuffle=True, num_workers=2)`, then per batch `.to(device)`,
forward, `CrossEntropyLoss`, backward, `SGD(momentum=0.9, weight_decay=5e-4).step()`. The model is the
same `build_model` network with the same width, in the default memory format. Timed from creating the
loader iterator (worker start-up is part of a tutorial epoch) to the last optimizer step.

Why it is fair: the same JPEGs (the engine packs them, the baseline reads them unpacked; the script
checks a few pixel by pixel), the same network and width, the same batch size, the same number of
images and steps (the baseline drops the ragged last batch as the engine does), the same CPU threads.
Rounds alternate engine and baseline so load from other processes hits both; medians are compared.

"Where the time goes": the engine's step is reimplemented here phase by phase with the engine's own
functions (data = index + normalize + augment_batch + memory-format copy; forward + loss; backward;
optimizer = set_lr + step), timed with perf_counter (CPU ops are synchronous). It runs once with
channels_last (the engine default) and once contiguous, alternating step by step, before anything else
in the process, and reports the first (cold) step apart from the median of the others. For the
baseline, the time blocked in `next(loader)` is split from the compute.
"""

from __future__ import annotations

import time

import _common as c
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from worker.engine.augment import augment_batch
from worker.engine.config import Budget, DataSpec, ModelSpec, RunSpec, TrainConfig
from worker.engine.model import build_model
from worker.engine.optim import build_optimizer, set_lr
from worker.engine.result import TrainResult
from worker.engine.schedule import lr_factor
from worker.engine.train import channel_stats, train

TARGET = 1.0  # the engine must be faster than the tutorial loop


def main() -> None:
    p = c.base_parser(__doc__)
    p.add_argument("--train-images", type=int, default=5120, help="class-balanced subset, both loops")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1, help="epochs per round, engine and baseline alike")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (baseline)")
    p.add_argument("--rounds", type=int, default=5, help="alternating engine/baseline rounds")
    p.add_argument("--breakdown-steps", type=int, default=12, help="steps per memory format in the breakdown")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.rounds, args.breakdown_steps = 1280, 2, 4
    threads = c.setup_cpu(args.threads)
    device = c.device_of(args)

    data = c.load_cifar(args.data, args.cache_dir, train_subset=args.train_images, test_subset=100)
    folder = c.unpack_train_subset(args.data, args.cache_dir, args.train_images)
    c.check_same_images(folder, data)
    n = data.num_train
    steps = n // args.batch_size
    mean, std = channel_stats(data.train_x)
    print(f"train step: {n} real CIFAR-10 images, ResNet18 width {args.width}, batch {args.batch_size}, "
          f"{steps} steps/epoch, {args.epochs} epoch(s), {c.device_note(device)}, {threads} torch threads; "
          f"{c.load_note()}")

    # ---- engine: one full train() call ------------------------------------------------------------------
    spec = RunSpec(config=TrainConfig(batch_size=args.batch_size, epochs=args.epochs, tta="none"),
                   model=ModelSpec(width=args.width), data=DataSpec(train_subset=n, test_subset=100),
                   budget=Budget(max_epochs=args.epochs), eval_every_epoch=False)

    spec32 = spec.model_copy(update={"config": spec.config.model_copy(update={"precision": "fp32"})})

    def engine_run(fp32: bool = False) -> TrainResult:
        return train(spec32 if fp32 else spec, data, device)

    # ---- baseline: the tutorial loop --------------------------------------------------------------------
    tutorial = c.tutorial_transform(mean, std)
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=tutorial)

    def baseline_run() -> dict:
        torch.manual_seed(0)
        model = build_model(ModelSpec(width=args.width), TrainConfig(), len(dataset.classes)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        criterion = torch.nn.CrossEntropyLoss()
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            drop_last=True)
        model.train()
        wait = compute = first_wait = 0.0
        images = 0
        t_start = time.perf_counter()
        for _ in range(args.epochs):
            t = time.perf_counter()
            for i, (x, y) in enumerate(loader):
                t_got = time.perf_counter()
                if i == 0:
                    first_wait += t_got - t  # includes starting the worker processes
                else:
                    wait += t_got - t
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
                c.sync(device)  # as a tutorial's loss.item() would: splits loader wait from GPU compute
                images += len(y)
                t = time.perf_counter()
                compute += t - t_got
        seconds = time.perf_counter() - t_start
        return {"images_per_sec": images / seconds, "seconds": seconds, "wait": wait,
                "first_wait": first_wait, "compute": compute, "images": images}

    # ---- where the time goes: the engine's step, phase by phase, channels_last vs contiguous -------------
    # First, while the process is cold: its first step shows the one-off warm-up (oneDNN kernels, memory).
    breakdown(data, args, mean, std, device)

    # ---- alternate rounds ---------------------------------------------------------------------------------
    rows, eng, eng32, base, base_runs = [], [], [], [], []
    precision = "?"
    for r in range(args.rounds):
        s = engine_run()
        s32 = engine_run(fp32=True)
        b = baseline_run()
        precision = s.precision
        eng.append(s.images_per_sec)
        eng32.append(s32.images_per_sec)
        base.append(b["images_per_sec"])
        base_runs.append(b)
        rows.append([r + 1, s.images_per_sec, s.timings.train_seconds, s32.images_per_sec,
                     b["images_per_sec"], b["seconds"], s.images_per_sec / b["images_per_sec"],
                     s32.images_per_sec / b["images_per_sec"]])
        print(f"  round {r + 1}/{args.rounds}: engine ({precision}) {s.images_per_sec:.0f} img/s, engine (fp32) "
              f"{s32.images_per_sec:.0f} img/s, baseline {b['images_per_sec']:.0f} img/s", flush=True)
    print()
    print(c.table(["round", f"engine ({precision}) img/s", "engine s", "engine (fp32) img/s", "baseline img/s",
                   "baseline s", "ratio", "ratio fp32"], rows))

    # ---- where the time goes: baseline ---------------------------------------------------------------------
    b = base_runs[len(base_runs) // 2]
    print()
    print(f"baseline epoch, where the time goes (round {len(base_runs) // 2 + 1}, {b['seconds']:.2f}s):")
    parts = [("first batch (worker start + decode)", b["first_wait"]),
             ("waiting on the loader (later batches)", b["wait"]),
             (".to(device) + forward + backward + step", b["compute"])]
    print(c.table(["phase", "seconds", "share"],
                  [[name, sec, f"{100 * sec / b['seconds']:.0f}%"] for name, sec in parts]))

    e_med, e32_med, b_med = c.median(eng), c.median(eng32), c.median(base)
    print()
    print(f"engine:   {e_med:8.0f} images/s (train(), automatic precision = {precision}, median of {args.rounds})")
    print(f"engine:   {e32_med:8.0f} images/s (train(), precision fp32: the loop alone, "
          f"{e32_med / b_med:.2f}x the baseline)")
    print(f"baseline: {b_med:8.0f} images/s (DataLoader + ImageFolder + PIL, {args.workers} workers, "
          f"median of {args.rounds})")
    print(f"({c.load_note()})")
    ratio = e_med / b_med
    print(f"RATIO engine/baseline = {ratio:.2f}x (target > {TARGET:.0f}x, engine faster): "
          f"{c.verdict(ratio > TARGET)}")


def breakdown(data, args, mean, std, device: torch.device) -> None:
    """The engine's step (as in worker.engine.train) with a clock between phases, for both memory formats."""
    cfg = TrainConfig(batch_size=args.batch_size)
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    runs = {}
    for name, fmt in formats.items():
        torch.manual_seed(0)
        model = build_model(ModelSpec(width=args.width), cfg, data.num_classes).to(device, memory_format=fmt)
        runs[name] = {"model": model, "opt": build_optimizer(model, cfg), "fmt": fmt,
                      "gen": torch.Generator(device=device).manual_seed(0), "times": []}
    n = data.num_train
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)

    def now() -> float:
        c.sync(device)  # on CUDA each phase is timed to its completion
        return time.perf_counter()

    total = args.breakdown_steps
    for step in range(total):
        for run in runs.values():  # alternate formats step by step: background load hits both alike
            model, opt, gen = run["model"], run["opt"], run["gen"]
            t0 = now()
            idx = torch.randperm(n, generator=gen, device=device)[:args.batch_size]
            x = augment_batch(train_x.index_select(0, idx), cfg, gen, mean=mean,
                              std=std).contiguous(memory_format=run["fmt"])
            y = train_y.index_select(0, idx)
            t1 = now()
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            t2 = now()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = now()
            set_lr(opt, cfg.lr, lr_factor(step, total, total, cfg))
            opt.step()
            t4 = now()
            run["times"].append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))

    phases = ["data (index+normalize+augment)", "forward + loss", "backward", "optimizer step"]
    print()
    print(f"engine step, where the time goes (ms; {total} steps per format, alternating; 'first' is step 1,\n"
          f"the process's first training step for channels_last; 'median' is over steps 2..{total}):")
    rows = []
    for i, phase in enumerate(phases + ["whole step"]):
        row: list[object] = [phase]
        for run in runs.values():
            vals = [sum(t) if i == len(phases) else t[i] for t in run["times"]]
            row += [1000 * vals[0], 1000 * c.median(vals[1:])] if len(vals) > 1 else [1000 * vals[0], "-"]
        rows.append(row)
    print(c.table(["phase", "channels_last first", "channels_last median", "contiguous first",
                   "contiguous median"], rows))
    cl = c.median(sum(t) for t in runs["channels_last"]["times"][1:])
    co = c.median(sum(t) for t in runs["contiguous"]["times"][1:])
    print(f"steady step: channels_last {1000 * cl:.0f} ms vs contiguous {1000 * co:.0f} ms "
          f"(contiguous/channels_last = {co / cl:.2f}x; > 1 means channels_last is faster on this CPU)")


if __name__ == "__main__":
    main()
