"""The engine on a CUDA device: AMP in bf16 and in fp16 with loss scaling, a real out-of-memory forced
and recovered by micro-batching, bitwise determinism, and every option at once.

These need a GPU, so they skip on the CPU-only machines CI runs on. `bench/gpu_check.py` runs them on a
GPU node, with the benchmarks, and prints one table.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.synthetic import synthetic_dataset
from worker.engine.config import Budget, ModelSpec, RunSpec, TrainConfig
from worker.engine.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(cfg: dict[str, Any], *, width: int = 16, n_train: int = 512, n_test: int = 200, size: int = 32,
         deterministic: bool = False, epochs: int = 2) -> tuple[dict, list[dict], torch.Tensor | None]:
    data = synthetic_dataset(n_train, n_test, image_size=size)
    spec = RunSpec(config=TrainConfig(epochs=epochs, **cfg), model=ModelSpec(width=width),
                   budget=Budget(max_epochs=epochs), deterministic=deterministic)
    events: list[dict] = []
    result = train(spec, data, "cuda", lambda e: events.append(e.model_dump()))
    return result.to_json(), events, result.logits


@pytest.mark.parametrize(("precision", "expected"), [
    ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"),
    ("auto", "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"),
])
def test_each_precision_trains_to_a_finite_loss(precision: str, expected: str) -> None:
    s, events, logits = _run({"precision": precision, "batch_size": 64})
    assert s["status"] == "succeeded" and s["precision"] == expected == events[0]["precision"]
    assert s["device"]["type"] == "cuda" and s["peak_memory_bytes"] > 0
    assert s["train_loss_final"] is not None and logits is not None and torch.isfinite(logits.float()).all()
    assert s["channels_last"] is True and s["memory_format_note"] is None  # the oneDNN guard is CPU-only


def test_fp16_uses_loss_scaling_and_learns() -> None:
    s, _, _ = _run({"precision": "fp16", "batch_size": 64, "lr": 0.1}, epochs=4)
    losses = [row["train_loss"] for row in s["history"]]
    assert s["status"] == "succeeded" and losses[-1] < losses[0]


def test_a_real_out_of_memory_is_recovered_by_micro_batching() -> None:
    """A batch of 8,192 images at 160x160 through a full-width ResNet18 with the CIFAR stem (no early
    downsampling) needs several hundred GiB of activations: more than any single GPU has. The engine
    halves the micro-batch until it fits and still takes one optimizer step over all 8,192 images."""
    s, events, _ = _run({"precision": "bf16", "batch_size": 8192, "ema_decay": None, "tta": "none"},
                        width=64, n_train=8192, n_test=64, size=160, epochs=1)
    ooms = [e for e in events if e["kind"] == "oom"]
    assert ooms, "no out-of-memory was forced: this GPU holds the whole batch, raise the image size"
    assert s["status"] == "succeeded" and s["micro_batch_size"] == ooms[-1]["micro_batch_size"] < 8192
    assert s["effective_batch_size"] == 8192 and s["steps_completed"] == 1


def test_deterministic_mode_is_bitwise_reproducible_on_cuda() -> None:
    first = _run({"batch_size": 64, "precision": "bf16"}, deterministic=True)
    again = _run({"batch_size": 64, "precision": "bf16"}, deterministic=True)
    assert torch.equal(first[2], again[2])
    assert [r["train_loss"] for r in first[0]["history"]] == [r["train_loss"] for r in again[0]["history"]]


def test_every_option_at_once_on_cuda() -> None:
    cfg = dict(optimizer="adamw", lr=0.003, batch_size=32, grad_accum_steps=2, grad_clip_norm=1.0,
               schedule="cosine", warmup_epochs=0.5, mixup_alpha=0.2, cutmix_alpha=1.0, cutmix_prob=0.5,
               ema_decay=0.9, swa_epochs=1, random_resized_crop=True, cutout_size=8, erasing_prob=0.25,
               jitter_brightness=0.2, jitter_contrast=0.2, jitter_saturation=0.2, jitter_hue=0.05,
               grayscale_prob=0.1, rotation_degrees=10.0, tta="flip_translate", stem="deep", se_blocks=True,
               dropout=0.1, label_smoothing=0.1, precision="auto")
    s, _, logits = _run(cfg, epochs=2)
    assert s["status"] == "succeeded" and s["evaluated_weights"] == "swa"
    assert logits is not None and torch.isfinite(logits.float()).all()
