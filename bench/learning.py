"""Learning: test accuracy vs wall time on the full real CIFAR-10, engine recipe vs a plain recipe, on CPU.

Both runs go through the same engine (`worker.engine.train.train`) with the same network (ResNet18,
width 16), the same data (all 50,000 training and 10,000 test images of the real CIFAR-10 JPEGs,
packed), the same batch size (256), the same on-device crop + flip, the same automatic precision (bf16
autocast on a CPU with native bf16 such as this AMD EPYC, fp32 elsewhere; `--precision` overrides it
for the engine recipe) and the same CPU threads. Only the recipe differs:

- plain: one-cycle SGD (momentum 0.9, no nesterov, weight decay on every tensor), no label
  smoothing, no EMA, no test-time augmentation, 6 epochs. This is the usual "ResNet18 on CIFAR-10 with
  one-cycle" baseline (about 81% at this width).
- engine: the recipe proposed for a CPU wall-clock budget (default 15 minutes, `Budget(max_seconds)`):
  nesterov SGD with one-cycle, no weight decay on norms/biases, label smoothing 0.1, an EMA of the
  weights (decay 0.99 per step, evaluated instead of the raw weights) and flip + translate TTA
  (6 views). Target: >= 85% test accuracy.

The one-cycle schedule is laid out over the planned epochs, so the number of epochs must fit the
budget: a short calibration run (the same recipe on a small subset, two epochs, the second one timed)
measures images/s first, and epochs = floor(budget * images/s * safety / 50,000). If the budget still
runs out first, the engine stops on time (stop reason "time_budget") with the schedule unfinished.

Accuracy is reported on the whole test set (both halves of the engine's public/private split), per
epoch on the public half without TTA, with the training seconds (what the budget counts) and the wall
seconds (training plus the per-epoch evaluations). The default run takes about 20 minutes on 2 idle
cores (calibration ~15 s; engine ~13.5 min of training + ~1 min of evaluation, 16 epochs at ~1,000
images/s in bf16; plain 6 epochs ~5 min), much longer when other processes share the cores; use --only
and --budget-minutes to run part of it. In fp32 (`--precision fp32`) the same budget fits 10 epochs
(~620 images/s), which reached 83.98%: the bf16 loop is what buys the epochs that reach 85%.
"""

from __future__ import annotations

import math
import time

import _common as c

from worker.engine.config import Budget, DataSpec, ModelSpec, RunSpec, TrainConfig
from worker.engine.result import EpochEvent, Event
from worker.engine.train import train

TARGET_ACC = 0.85
PLAIN_REFERENCE = 0.81


def engine_config(epochs: int, batch_size: int, precision: str = "auto") -> TrainConfig:
    """The engine's own defaults (nesterov one-cycle SGD, label smoothing 0.1, EMA 0.99 with warm-up,
    flip + translate TTA, crop + flip, channels_last, automatic precision): only the epochs and batch
    size are set here (and the precision, with --precision)."""
    return TrainConfig(batch_size=batch_size, epochs=epochs, precision=precision)


def plain_config(epochs: int, batch_size: int) -> TrainConfig:
    """One-cycle SGD, crop and flip, nothing else."""
    return TrainConfig(
        optimizer="sgd", lr=0.2, momentum=0.9, nesterov=False, weight_decay=5e-4, no_decay_norm_bias=False,
        batch_size=batch_size, epochs=epochs,
        schedule="onecycle", onecycle_pct_start=0.25, final_lr_frac=0.0,
        label_smoothing=0.0, ema_decay=None,
        crop_padding=4, flip=True, cutout_size=0,
        tta="none", channels_last=True,
    )


def main() -> None:
    p = c.base_parser(__doc__)
    p.add_argument("--budget-minutes", type=float, default=15.0, help="engine recipe's training budget")
    p.add_argument("--only", choices=["engine", "plain", "both"], default="both")
    p.add_argument("--epochs", type=int, default=None,
                   help="engine recipe's planned epochs (default: calibrated to fit the budget)")
    p.add_argument("--plain-epochs", type=int, default=6)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="engine recipe's precision (default: the engine's automatic choice)")
    p.add_argument("--train-subset", type=int, default=None, help="default: all 50,000")
    p.add_argument("--test-subset", type=int, default=None, help="default: all 10,000")
    p.add_argument("--calibration-images", type=int, default=5120, help="subset for the calibration run")
    p.add_argument("--safety", type=float, default=0.9, help="fraction of the calibrated rate to plan with")
    p.add_argument("--no-epoch-eval", action="store_true", help="skip the per-epoch public-half evaluation")
    args = p.parse_args()
    if args.quick:
        args.budget_minutes, args.plain_epochs = 0.2, 1
        args.train_subset, args.test_subset, args.calibration_images = 2560, 300, 768
    threads = c.setup_cpu(args.threads)
    device = c.device_of(args)

    data = c.load_cifar(args.data, args.cache_dir, args.train_subset, args.test_subset)
    budget_s = 60 * args.budget_minutes
    print(f"learning: ResNet18 width {args.width}, {data.num_train:,} train / {data.num_test:,} test real "
          f"CIFAR-10 images, batch {args.batch_size}, {c.device_note(device)}, {threads} torch threads; "
          f"{c.load_note()}")
    results: dict[str, dict] = {}

    if args.only in ("engine", "both"):
        epochs = args.epochs
        if epochs is None:
            rate = calibrate(args, engine_config(2, args.batch_size, args.precision), device)
            epochs = max(1, math.floor(budget_s * rate * args.safety / data.num_train))
            print(f"[calibration] {rate:.0f} images/s -> {epochs} epochs planned for a "
                  f"{budget_s / 60:.1f}-minute budget (safety {args.safety}); about "
                  f"{epochs * data.num_train / rate / 60:.1f} min of training")
        budget = Budget(max_epochs=epochs, max_seconds=budget_s)
        spec = run_spec(args, engine_config(epochs, args.batch_size, args.precision), budget)
        results["engine"] = run("engine", spec, data, device)

    if args.only in ("plain", "both"):
        budget = Budget(max_epochs=args.plain_epochs)
        spec = run_spec(args, plain_config(args.plain_epochs, args.batch_size), budget)
        results["plain"] = run("plain", spec, data, device)

    # ---- summary -----------------------------------------------------------------------------------------
    print()
    rows = [[name, f"{100 * r['acc']:.2f}%", f"{100 * r['public']:.2f}%", f"{100 * r['private']:.2f}%",
             f"{r['epochs_done']}/{r['epochs_planned']}", r["train_s"] / 60, r["wall_s"] / 60, r["stop"],
             r["weights"], r["tta"]] for name, r in results.items()]
    print(c.table(["recipe", "test acc", "public", "private", "epochs", "train min", "wall min", "stop",
                   "weights", "tta"], rows))
    print(f"({c.load_note()})")
    scale = "" if data.num_train == 50_000 and data.num_test == 10_000 else \
        " [subset run: the target is for the full dataset, shown for format only]"
    if "engine" in results:
        acc = results["engine"]["acc"]
        ok = acc >= TARGET_ACC and results["engine"]["train_s"] <= budget_s * 1.02
        if "plain" in results:
            plain = results["plain"]["acc"]
            print(f"RATIO engine/plain accuracy = {100 * acc:.2f}% / {100 * plain:.2f}% = "
                  f"{acc / plain:.3f}x (target: engine >= {100 * TARGET_ACC:.0f}% within "
                  f"{args.budget_minutes:g} min, plain ~{100 * PLAIN_REFERENCE:.0f}%): "
                  f"{c.verdict(ok)}{scale}")
        else:
            minutes = results["engine"]["train_s"] / 60
            print(f"RESULT engine = {100 * acc:.2f}% in {minutes:.1f} min of training (target >= "
                  f"{100 * TARGET_ACC:.0f}% within {args.budget_minutes:g} min): {c.verdict(ok)}{scale}")
    else:
        print(f"RESULT plain = {100 * results['plain']['acc']:.2f}% after {args.plain_epochs} epochs "
              f"(reference ~{100 * PLAIN_REFERENCE:.0f}%){scale}")


def run_spec(args, cfg: TrainConfig, budget: Budget) -> RunSpec:
    return RunSpec(config=cfg, model=ModelSpec(width=args.width),
                   data=DataSpec(train_subset=args.train_subset, test_subset=args.test_subset),
                   budget=budget, eval_every_epoch=not args.no_epoch_eval)


def calibrate(args, cfg: TrainConfig, device) -> float:
    """Images/s of the recipe's second epoch on a small subset (the first carries the warm-up)."""
    data = c.load_cifar(args.data, args.cache_dir, args.calibration_images, 100)
    spec = RunSpec(config=cfg.model_copy(update={"epochs": 2, "tta": "none"}),
                   model=ModelSpec(width=args.width), budget=Budget(max_epochs=2), eval_every_epoch=False)
    return train(spec, data, device).history[-1].images_per_sec


def run(name: str, spec: RunSpec, data, device) -> dict:
    cfg = spec.config
    print(f"\n[{name}] {cfg.model_dump(exclude_defaults=True)}; budget {spec.budget.model_dump()}",
          flush=True)
    t0 = time.perf_counter()
    rows = []

    def on_event(e: Event) -> None:
        if isinstance(e, EpochEvent):
            acc = e.test_accuracy
            rows.append([e.epoch, e.train_loss, e.seconds, time.perf_counter() - t0,
                         "-" if acc is None else f"{100 * acc:.2f}%", e.images_per_sec])
            shown = "-" if acc is None else f"{100 * acc:.2f}%"
            print(f"  epoch {e.epoch}/{e.epochs}: loss {_num(e.train_loss):.3f}, "
                  f"train {e.seconds:.0f}s, wall {time.perf_counter() - t0:.0f}s, public acc {shown}",
                  flush=True)

    r = train(spec, data, device, on_event)
    wall = time.perf_counter() - t0
    print(c.table(["epoch", "train loss", "train s", "wall s", "public acc (no TTA)", "img/s"], rows))
    acc = _num(r.metrics.accuracy_all if r.metrics else None)
    print(f"  final ({r.evaluated_weights or '-'} weights, tta {cfg.tta}): test {100 * acc:.2f}% after "
          f"{r.timings.train_seconds:.0f}s of training, {wall:.0f}s wall; stop reason {r.stop_reason.value}")
    return {"acc": acc, "public": _num(r.accuracy), "private": _num(r.private_accuracy),
            "epochs_done": r.epochs_completed, "epochs_planned": r.epochs_planned,
            "train_s": r.timings.train_seconds, "wall_s": wall, "stop": r.stop_reason.value,
            "weights": r.evaluated_weights or "-", "tta": cfg.tta}


def _num(v: float | None) -> float:
    """A metric a run that did not succeed (or an empty half) lacks prints as nan."""
    return float("nan") if v is None else v


if __name__ == "__main__":
    main()
