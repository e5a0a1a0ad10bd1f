"""The packed dataset cache: one torch file per (source content, image size), in the cache directory.

Decoding is done once per (source content, image size): the result is packed into a single torch file in
`cache_dir`, named `packed-<hash16>-<size>px.pt`, which later loads memory-map in milliseconds.
The cache key is a sha256 of the source's content (the tarball's bytes; every image's relative path
and bytes for a folder; the batch files for a torchvision root). For folders the digest is remembered
in a small side file keyed by the files' paths, sizes and mtimes, so an unchanged tree is not re-read.
Cache files are only ever written whole and swapped in with `os.replace`, so concurrent packers cannot
corrupt them. The returned tensors memory-map the cache file copy-on-write (writing to them never
touches the file); delete or replace a cache file, never truncate or rewrite it in place, while a
process may still be reading it (a mapped file shrunk in place raises SIGBUS in the reader).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from worker.engine.sources import (
    CIFAR_FILES,
    CIFAR_FOLDER,
    DatasetError,
    cifar_root,
    decode,
    describe,
    find_layout,
    source_kind,
    walk_folder,
)

log = logging.getLogger(__name__)

PACK_FORMAT = 1


def pack_source(path: str | Path, image_size: int, cache_dir: str | Path) -> Path:
    """Decode the source at `path` at `image_size` into `cache_dir` (once) and return the cache file."""
    path = Path(path)
    cache_dir = Path(cache_dir)
    kind = source_kind(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    content_hash = _content_hash(path, kind, cache_dir)
    target = cache_dir / f"packed-{content_hash[:16]}-{image_size}px.pt"
    if target.exists():
        return target

    t0 = time.perf_counter()
    log.info("packing %s at %dpx into %s", describe(path), image_size, target)
    train_x, train_y, test_x, test_y, classes = decode(path, kind, image_size)
    payload = {
        "format": PACK_FORMAT,
        "train_x": _to_nchw(train_x), "train_y": torch.from_numpy(train_y),
        "test_x": _to_nchw(test_x), "test_y": torch.from_numpy(test_y),
        "classes": list(classes), "content_hash": content_hash, "image_size": int(image_size),
        "source": str(path),
    }
    atomic_save(payload, target)
    log.info("packed %d + %d images from %s in %.1fs", len(train_y), len(test_y), path,
             time.perf_counter() - t0)
    return target


def read_packed(path: Path) -> dict:
    """The packed file's dict, its tensors memory-mapped; ValueError if it is not a valid packed dataset."""
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(data, dict) or data.get("format") != PACK_FORMAT:
        raise ValueError(f"{path} is not a packed dataset of format {PACK_FORMAT}")
    for split in ("train", "test"):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or y.dtype != torch.int64 \
                or y.shape != (x.shape[0],):
            raise ValueError(f"{path}: {split} tensors have unexpected shapes or dtypes")
    return data


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# Content hashes (the cache key)
# ----------------------------------------------------------------------------------------------------


def _content_hash(path: Path, kind: str, cache_dir: Path) -> str:
    if kind == "tar":
        return _file_sha256(path)
    if kind == "cifar":
        folder = cifar_root(path) / CIFAR_FOLDER
        files = [name for name in CIFAR_FILES if (folder / name).is_file()]
        if not files:
            raise DatasetError(f"{folder} holds none of the CIFAR-10 batch files ({', '.join(CIFAR_FILES)})")
        return _memoised_hash(folder, files, cache_dir)
    layout = find_layout(walk_folder(path), f"folder {path}")
    return _memoised_hash(path, layout.all_files(), cache_dir)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _memoised_hash(root: Path, files: list[str], cache_dir: Path) -> str:
    """sha256 over sorted (relative path, bytes); remembered under a key of paths, sizes and mtimes."""
    files = sorted(files)
    stats: list = [str(root.resolve())]
    for rel in files:
        st = (root / rel).stat()
        stats.append([rel, st.st_size, st.st_mtime_ns])
    fingerprint = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    memo = cache_dir / f"srchash-{fingerprint[:32]}.txt"
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    for rel in files:
        data = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    digest = h.hexdigest()
    atomic_write(memo, lambda f: f.write(digest.encode()))
    return digest


# ----------------------------------------------------------------------------------------------------
# Writing whole files
# ----------------------------------------------------------------------------------------------------


def atomic_write(target: Path, write: Callable) -> None:
    """Write `target` whole or not at all: a temporary file beside it (`.<name>.*.tmp`), fsync, rename. A
    process killed mid-write leaves the previous file in place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(payload: dict, target: Path) -> None:
    atomic_write(target, lambda f: torch.save(payload, f))
