"""Evaluation: batched inference with TTA, accuracy, calibration, and the public/private test split.

Metrics take float logits (M, K) and integer labels (M,) on any device and return plain Python
floats/lists, ready to be stored as JSON. Calibration follows Guo et al. (2017), "On Calibration of
Modern Neural Networks": ECE over equal-width max-probability bins, and temperature scaling.

The test set is split once, deterministically, into a public half and a private half, and the metrics
are reported for each. A run's `accuracy`, the score the leaderboard ranks on, is the public half's.
The private half's (`private_accuracy`, and `accuracy_all` over both halves) is stored with the run but
stripped from everything participants see, so it stays a score that nobody has tuned against; no
leaderboard shows it yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.augment import tta_views
from worker.engine.split import SPLIT_SEED, public_private_indices

# ----------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------


def predict_logits(
    model: nn.Module,
    x_uint8: Tensor,
    batch_size: int,
    *,
    device: torch.device | str,
    mean: Sequence[float],
    std: Sequence[float],
    tta: str,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Float32 logits (M, K) on the CPU for uint8 images (M, C, H, W), averaged over the TTA views.

    `mean`/`std` are per-channel statistics on the [0, 1] scale (torchvision convention). Batches are
    moved as uint8 and normalised on the device, which moves 4x fewer bytes than float input. Logits,
    not probabilities, are averaged over views, so temperature scaling afterwards acts on one set of
    logits. The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
        raise ValueError(f"expected a uint8 batch (M, C, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")

    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else nullcontext())

    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, x_uint8.shape[0], batch_size):
                xb = x_uint8[start:start + batch_size].to(device, non_blocking=True)
                xb = (xb.float().div_(255.0) - m) / s
                views = tta_views(xb, tta)
                total: Tensor | None = None
                for v in views:
                    with amp:
                        out = model(v.contiguous(memory_format=memory_format))
                    # Accumulate in float32 whatever precision autocast ran in.
                    out = out.float()
                    total = out if total is None else total + out
                assert total is not None  # tta_views always returns at least the identity view
                chunks.append((total / len(views)).cpu())
    finally:
        model.train(was_training)

    if not chunks:
        return torch.empty(0, 0, dtype=torch.float32)
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in [0, 1]; NaN for an empty set."""
    if y.numel() == 0:
        return math.nan
    return (logits.argmax(1) == y.to(logits.device)).float().mean().item()


def per_class_accuracy(logits: Tensor, y: Tensor, num_classes: int) -> list[float]:
    """Recall of each class, indexed by class id. A class with no examples gets NaN (not 0: it was
    never wrong either); callers serialising to strict JSON must map NaN to null."""
    y = y.to(logits.device).long()
    correct = (logits.argmax(1) == y).double()
    hits = torch.zeros(num_classes, dtype=torch.float64, device=logits.device).index_add_(0, y, correct)
    counts = torch.bincount(y, minlength=num_classes).double()
    return [h / c if c > 0 else math.nan for h, c in zip(hits.tolist(), counts.tolist(), strict=True)]


# ----------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------


def ece(logits: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: sum over bins of |B|/N * |accuracy(B) - mean confidence(B)|.

    Confidence is the max softmax probability; bins are equal-width and right-closed, (k/n, (k+1)/n],
    with a confidence of exactly 0 (impossible for a softmax) folded into the first bin.
    """
    if y.numel() == 0:
        return math.nan
    probs = F.softmax(logits.double(), dim=1)
    conf, pred = probs.max(1)
    correct = (pred == y.to(logits.device)).double()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp_(0, n_bins - 1)

    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, conf)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, bins, correct)
    # |sum(correct) - sum(conf)| / N per bin equals |B|/N * |acc(B) - conf(B)|, and is 0 for empty bins.
    return ((correct_sum - conf_sum).abs().sum() / y.numel()).item()


def _nll(logits: Tensor, y: Tensor, log_t: float) -> float:
    return F.cross_entropy(logits / math.exp(log_t), y).item()


def fit_temperature(logits: Tensor, y: Tensor, *, log_t_min: float = -3.0, log_t_max: float = 4.0,
                    iters: int = 80) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T), by golden-section search on log T.

    The NLL is convex in 1/T, hence unimodal in log T, so golden-section search finds the optimum
    without gradients, learning rates or randomness: the same logits always give the same T. The search
    covers T in [e^-3, e^4] ~ [0.05, 55]; 80 iterations shrink that bracket below float64 resolution.
    """
    if y.numel() == 0:
        return 1.0
    z = logits.detach().double().cpu()
    t = y.detach().long().cpu()
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = log_t_min, log_t_max
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = _nll(z, t, c), _nll(z, t, d)
    for _ in range(iters):
        if fc <= fd:  # ties go left: deterministic, and prefers the sharper (smaller T) model
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = _nll(z, t, c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = _nll(z, t, d)
    return math.exp((a + b) / 2.0)


# ----------------------------------------------------------------------------------------------------
# Public / private split
# ----------------------------------------------------------------------------------------------------


def split_public_private(n: int, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """worker.engine.split.public_private_indices as long tensors: (public, private), each sorted."""
    public, private = public_private_indices(n, seed)
    return torch.tensor(public, dtype=torch.long), torch.tensor(private, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def evaluate_halves(logits: Tensor, y: Tensor, num_classes: int, public_idx: Tensor,
                    private_idx: Tensor) -> dict[str, Any]:
    """Metrics of the whole test set and of each half.

    {"temperature": T, "accuracy_all": acc,
     "public":  {"accuracy", "per_class_accuracy", "ece", "ece_temperature"},
     "private": {...same...}}

    The temperature is fitted on the PUBLIC half only and then applied to both halves: fitting on the
    private half would let the private calibration score see its own labels. `ece_temperature` is the
    ECE after dividing the logits by that temperature; it never changes accuracy.
    """
    logits = logits.detach().float().cpu()
    y = y.detach().long().cpu()
    public_idx = public_idx.long().cpu()
    private_idx = private_idx.long().cpu()

    temperature = fit_temperature(logits[public_idx], y[public_idx])
    scaled = logits / temperature

    def half(idx: Tensor) -> dict[str, Any]:
        return {
            "accuracy": accuracy(logits[idx], y[idx]),
            "per_class_accuracy": per_class_accuracy(logits[idx], y[idx], num_classes),
            "ece": ece(logits[idx], y[idx]),
            "ece_temperature": ece(scaled[idx], y[idx]),
        }

    return {
        "temperature": temperature,
        "accuracy_all": accuracy(logits, y),
        "public": half(public_idx),
        "private": half(private_idx),
    }


__all__ = [
    "accuracy",
    "ece",
    "evaluate_halves",
    "fit_temperature",
    "per_class_accuracy",
    "predict_logits",
    "split_public_private",
]
