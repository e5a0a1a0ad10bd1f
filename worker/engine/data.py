"""The engine's dataset: a `DataSpec` in, uint8 tensors out. No database, no Celery, no HTTP.

`load_dataset` resolves the spec to a source (`sources`: a torchvision CIFAR-10 root, an image-folder
tree or a tarball of one), packs it once into the cache directory (`packing`), memory-maps the packed
file and cuts the class-balanced subsets the spec asks for (`subsets`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.engine.config import DataSpec
from worker.engine.packing import pack_source, read_packed
from worker.engine.sources import DatasetError, describe, resolve_source
from worker.engine.subsets import balanced_subset, check_subset

__all__ = ["Dataset", "DatasetError", "load_dataset"]

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    train_x: torch.Tensor = field(repr=False)  # uint8 (N, 3, H, W), CPU, contiguous
    train_y: torch.Tensor = field(repr=False)  # int64 (N,)
    test_x: torch.Tensor = field(repr=False)  # uint8 (M, 3, H, W)
    test_y: torch.Tensor = field(repr=False)  # int64 (M,)
    classes: list[str]
    source: str
    content_hash: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


def load_dataset(spec: DataSpec, cache_dir: Path | str, *, download: bool = True,
                 default_path: str | Path | None = None) -> Dataset:
    """Resolve `spec` to a source, pack it into `cache_dir` once, and return (a subset of) it.

    For `cifar10` without `spec.path` the order is: `cache_dir/cifar-10-batches-py` (torchvision
    format), then `default_path` if it exists, then a torchvision download into `cache_dir` if
    `download`. `imagefolder` needs `spec.path`. Raises `DatasetError` naming what is wrong and where.
    """
    cache_dir = Path(cache_dir)
    source = resolve_source(spec, cache_dir, download=download, default_path=default_path)
    packed = pack_source(source, spec.image_size, cache_dir)
    try:
        data = read_packed(packed)
    except Exception as e:  # a damaged cache file (disk full, manual edit): pack it again once
        log.warning("packed dataset %s is unreadable (%s); packing again", packed, e)
        packed.unlink(missing_ok=True)
        packed = pack_source(source, spec.image_size, cache_dir)
        data = read_packed(packed)

    classes = list(data["classes"])
    train_x, train_y = data["train_x"], data["train_y"]
    test_x, test_y = data["test_x"], data["test_y"]
    if spec.train_subset is not None:
        check_subset(train_y, spec.train_subset, classes, "train_subset", "train")
        train_x, train_y = balanced_subset(train_x, train_y, spec.train_subset, len(classes))
    if spec.test_subset is not None:
        check_subset(test_y, spec.test_subset, classes, "test_subset", "test")
        test_x, test_y = balanced_subset(test_x, test_y, spec.test_subset, len(classes))
    return Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes,
                   source=f"{describe(source)} ({spec.image_size}px, cached in {packed.name})",
                   content_hash=str(data["content_hash"]))
