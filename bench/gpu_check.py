"""One command for a CUDA node: the engine's CUDA tests, every benchmark on the GPU, and a full-width
ResNet18 epoch, summed up in one table. Under 10 minutes on one modern GPU.

    .venv/bin/python bench/gpu_check.py [--data PATH/cifar10-jpg.tar.gz] [--device cuda:0]

Each step runs as its own process (a CUDA fault fails one row, not the check); the table gives each
step's verdict, its wall time and its key line. Nothing here runs without a GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EPOCH = """
import sys, time, torch
from worker.engine.config import Budget, ModelSpec, RunSpec, TrainConfig
from tests.synthetic import synthetic_dataset
from worker.engine.train import train
data = synthetic_dataset(50_000, 1_000, image_size=32)  # full CIFAR-10 size; the timing needs no real pixels
spec = RunSpec(config=TrainConfig(epochs=1, batch_size=512, tta="none"), model=ModelSpec(width=64),
               budget=Budget(max_epochs=1), eval_every_epoch=False)
t = time.perf_counter()
r = train(spec, data, sys.argv[1])
print(f"full-width ResNet18, 50,000 images, batch 512, {r.precision}: train {r.timings.train_seconds:.1f} s "
      f"({r.images_per_sec:.0f} img/s), whole run {time.perf_counter() - t:.1f} s, "
      f"peak {r.peak_memory_bytes / 2**30:.1f} GiB on {r.device.name}")
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="the CIFAR-10 JPEG tarball for the benchmarks")
    p.add_argument("--device", default="cuda")
    p.add_argument("--learning-minutes", type=float, default=2.0, help="engine budget in bench/learning.py")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: run this on a GPU node")
    py = sys.executable
    data = ["--data", str(args.data)] if args.data else []
    dev = ["--device", args.device]
    steps = [
        ("engine tests on CUDA", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/engine/test_cuda.py"],
         240),
        ("input pipeline", [py, "bench/input_pipeline.py", *dev, *data], 180),
        ("training step", [py, "bench/train_step.py", *dev, *data], 240),
        ("overhead", [py, "bench/overhead.py", *dev, *data], 180),
        ("learning", [py, "bench/learning.py", *dev, *data, "--budget-minutes", str(args.learning_minutes)], 420),
        ("full-width epoch", [py, "-c", EPOCH, args.device], 240),
    ]
    rows = []
    for name, cmd, limit in steps:
        t = time.perf_counter()
        print(f"== {name}: {' '.join(cmd[:4])} ...", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            out = (proc.stdout + proc.stderr).strip().splitlines()
            verdict = "PASS" if proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
            key = next((line for line in reversed(out) if line.strip()), "")
            print("\n".join(out[-15:]), flush=True)
        except subprocess.TimeoutExpired:
            verdict, key = f"FAIL (over {limit} s)", ""
        rows.append((name, verdict, time.perf_counter() - t, key))

    print(f"\nGPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"| {'step':<22} | {'verdict':<16} | {'seconds':>7} | key line")
    print(f"|{'-' * 24}|{'-' * 18}|{'-' * 9}|{'-' * 40}")
    for name, verdict, seconds, key in rows:
        print(f"| {name:<22} | {verdict:<16} | {seconds:7.1f} | {key[:160]}")
    sys.exit(0 if all(r[1] == "PASS" for r in rows) else 1)


if __name__ == "__main__":
    main()
