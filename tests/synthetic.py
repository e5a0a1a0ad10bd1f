"""A synthetic dataset for tests and the GPU check: learnable in a few epochs, made in memory, no files."""

from __future__ import annotations

import hashlib

import torch

from worker.engine.data import Dataset


def synthetic_dataset(n_train: int, n_test: int, num_classes: int = 10, image_size: int = 32,
                      seed: int = 0) -> Dataset:
    """A small learnable dataset for tests: each class has its own colour and stripe pattern, plus noise.

    Class balanced (labels cycle through the classes, then shuffled); fully determined by the arguments.
    """
    if num_classes < 1 or n_train < 1 or n_test < 1 or image_size < 1:
        raise ValueError("synthetic_dataset needs positive sizes")
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 0.6 + 0.2  # per-class mean colour
    angles = torch.arange(num_classes) * (torch.pi / num_classes)  # per-class stripe orientation
    freqs = 2 * torch.pi * (1.5 + (torch.arange(num_classes) % 3)) / image_size  # per-class stripe frequency
    coords = torch.arange(image_size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        phase = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi  # random shift: patterns are not copies
        a, f = angles[y].view(n, 1, 1), freqs[y].view(n, 1, 1)
        stripes = torch.sin(f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)  # (n, H, W)
        img = colours[y] + 0.25 * stripes.unsqueeze(1) + 0.12 * torch.randn(n, 3, image_size, image_size,
                                                                               generator=g)
        x = (img.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        return x, y.to(torch.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    key = f"synthetic:{n_train}:{n_test}:{num_classes}:{image_size}:{seed}"
    return Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                   classes=[f"class{i}" for i in range(num_classes)],
                   source=f"synthetic(n_train={n_train}, n_test={n_test}, classes={num_classes}, "
                          f"size={image_size}, seed={seed})",
                   content_hash=hashlib.sha256(key.encode()).hexdigest())
