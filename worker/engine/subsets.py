"""Class-balanced subsets, applied after loading: the first n // num_classes images of each class, in
their original order, so the same n always picks the same images."""

from __future__ import annotations

import torch

from worker.engine.sources import DatasetError


def balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n // num_classes examples of every class, in their original order (deterministic)."""
    per_class = n // num_classes
    if per_class < 1:
        raise DatasetError(f"a subset of {n} cannot hold one image of each of {num_classes} classes")
    keep: list[torch.Tensor] = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() < per_class:
            raise DatasetError(f"a balanced subset of {n} needs {per_class} images of class {c}, "
                               f"but there are only {idx.numel()}")
        keep.append(idx[:per_class])
    order = torch.sort(torch.cat(keep)).values
    return x.index_select(0, order).contiguous(), y.index_select(0, order).contiguous()


def check_subset(y: torch.Tensor, n: int, classes: list[str], setting: str, split: str) -> None:
    """Refuse `data.<setting>=n` in the spec's own terms when `split` has too few images of some class."""
    per_class = n // len(classes)
    if per_class < 1:
        raise DatasetError(f"data.{setting}={n} is smaller than the number of classes ({len(classes)})")
    counts = torch.bincount(y, minlength=len(classes))
    short = [f"{classes[c]!r} has {int(counts[c])}" for c in range(len(classes)) if counts[c] < per_class]
    if short:
        raise DatasetError(f"data.{setting}={n} needs {per_class} {split} images per class, but "
                           + ", ".join(short))
