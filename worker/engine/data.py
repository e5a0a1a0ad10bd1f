"""Dataset loading and packing: a `DataSpec` in, uint8 tensors out. No database, no Celery, no HTTP.

Three kinds of source are understood:

- a torchvision CIFAR-10 root (a folder holding `cifar-10-batches-py/`), read with torchvision's own
  reader (which checks the md5 of every batch file);
- an image-folder tree: `train/<class>/<image>` plus `test/<class>/<image>` (or `val/...`), any
  format PIL reads, any resolution;
- the same tree inside a tarball (.tar, .tar.gz, .tgz, ...), read in place with `tarfile`. The tree
  may sit under a top-level folder (`cifar10/train/...`) or not.

Every image is converted to RGB and resized (PIL bilinear) to `image_size` x `image_size`. Decoding is
done once per (source content, image size): the result is packed into a single torch file in
`cache_dir`, named `packed-<hash16>-<size>px.pt`, which later loads memory-map in milliseconds.
The cache key is a sha256 of the source's content (the tarball's bytes; every image's relative path
and bytes for a folder; the batch files for a torchvision root). For folders the digest is remembered
in a small side file keyed by the files' paths, sizes and mtimes, so an unchanged tree is not re-read.
Cache files are only ever written whole and swapped in with `os.replace`, so concurrent packers cannot
corrupt them. The returned tensors memory-map the cache file copy-on-write (writing to them never
touches the file); delete or replace a cache file, never truncate or rewrite it in place, while a
process may still be reading it (a mapped file shrunk in place raises SIGBUS in the reader).

Labels follow the sorted class-folder names (for CIFAR-10 this is torchvision's order: airplane,
automobile, bird, cat, deer, dog, frog, horse, ship, truck). Subsets are applied after loading, with
`balanced_subset`: the first n // num_classes images of each class, in their original order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from worker.engine.config import DataSpec

log = logging.getLogger(__name__)

PACK_FORMAT = 1
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta")
TEST_SPLITS = ("test", "val")
HOW_TO_POINT = ("set HPARENA_DATASET_PATH (or the competition's data.path) to a local copy: an image-folder "
                "tarball such as cifar10-jpg.tar.gz, an image-folder tree (train/<class>/, test/<class>/), "
                "or a torchvision root containing cifar-10-batches-py/")


class DatasetError(ValueError):
    """The dataset is missing or malformed; the message names what and where."""


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


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def load_dataset(spec: DataSpec, cache_dir: Path | str, *, download: bool = True,
                 default_path: str | Path | None = None) -> Dataset:
    """Resolve `spec` to a source, pack it into `cache_dir` once, and return (a subset of) it.

    For `cifar10` without `spec.path` the order is: `cache_dir/cifar-10-batches-py` (torchvision
    format), then `default_path` if it exists, then a torchvision download into `cache_dir` if
    `download`. `imagefolder` needs `spec.path`.
    """
    cache_dir = Path(cache_dir)
    source = _resolve_source(spec, cache_dir, download=download, default_path=default_path)
    packed = pack_source(source, spec.image_size, cache_dir)
    try:
        data = _read_packed(packed)
    except Exception as e:  # a damaged cache file (disk full, manual edit): pack it again once
        log.warning("packed dataset %s is unreadable (%s); packing again", packed, e)
        packed.unlink(missing_ok=True)
        packed = pack_source(source, spec.image_size, cache_dir)
        data = _read_packed(packed)

    classes = list(data["classes"])
    train_x, train_y = data["train_x"], data["train_y"]
    test_x, test_y = data["test_x"], data["test_y"]
    if spec.train_subset is not None:
        _check_subset(train_y, spec.train_subset, classes, "train_subset", "train")
        train_x, train_y = balanced_subset(train_x, train_y, spec.train_subset, len(classes))
    if spec.test_subset is not None:
        _check_subset(test_y, spec.test_subset, classes, "test_subset", "test")
        test_x, test_y = balanced_subset(test_x, test_y, spec.test_subset, len(classes))
    return Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes,
                   source=f"{_describe(source)} ({spec.image_size}px, cached in {packed.name})",
                   content_hash=str(data["content_hash"]))


def pack_source(path: str | Path, image_size: int, cache_dir: str | Path) -> Path:
    """Decode the source at `path` at `image_size` into `cache_dir` (once) and return the cache file."""
    path = Path(path)
    cache_dir = Path(cache_dir)
    kind = _source_kind(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    content_hash = _content_hash(path, kind, cache_dir)
    target = cache_dir / f"packed-{content_hash[:16]}-{image_size}px.pt"
    if target.exists():
        return target

    t0 = time.perf_counter()
    log.info("packing %s at %dpx into %s", _describe(path), image_size, target)
    if kind == "cifar":
        train_x, train_y, test_x, test_y, classes = _decode_cifar_root(_cifar_root(path), image_size)
    elif kind == "tar":
        train_x, train_y, test_x, test_y, classes = _decode_tar(path, image_size)
    else:
        train_x, train_y, test_x, test_y, classes = _decode_folder(path, image_size)
    payload = {
        "format": PACK_FORMAT,
        "train_x": _to_nchw(train_x), "train_y": torch.from_numpy(train_y),
        "test_x": _to_nchw(test_x), "test_y": torch.from_numpy(test_y),
        "classes": list(classes), "content_hash": content_hash, "image_size": int(image_size),
        "source": str(path),
    }
    _atomic_save(payload, target)
    log.info("packed %d + %d images from %s in %.1fs", len(train_y), len(test_y), path,
             time.perf_counter() - t0)
    return target


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


# ----------------------------------------------------------------------------------------------------
# Resolving a spec to a source
# ----------------------------------------------------------------------------------------------------


def _resolve_source(spec: DataSpec, cache_dir: Path, *, download: bool,
                    default_path: str | Path | None) -> Path:
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise DatasetError(f"dataset path {str(path)!r} does not exist")
        return path
    if spec.name == "imagefolder":
        raise DatasetError("data.name='imagefolder' needs data.path: an image-folder tree "
                           "(train/<class>/, test/<class>/ or val/<class>/) or a tarball of one")

    # cifar10 without a path
    if (cache_dir / CIFAR_FOLDER).is_dir():
        return cache_dir
    missing_default = ""
    if default_path is not None:
        default = Path(default_path).expanduser()
        if default.exists():
            return default
        missing_default = f" (the default dataset path {str(default)!r} does not exist)"
    if not download:
        raise DatasetError(f"CIFAR-10 is not in {cache_dir / CIFAR_FOLDER} and downloading is disabled"
                           f"{missing_default}; {HOW_TO_POINT}")
    import torchvision

    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        torchvision.datasets.CIFAR10(str(cache_dir), train=True, download=True)
    except Exception as e:
        raise DatasetError(f"downloading CIFAR-10 into {cache_dir} failed ({type(e).__name__}: {e}); "
                           f"this machine may be offline{missing_default}. To use a local copy, "
                           f"{HOW_TO_POINT}") from e
    return cache_dir


def _source_kind(path: Path) -> str:
    if not path.exists():
        raise DatasetError(f"dataset path {str(path)!r} does not exist")
    if path.is_dir():
        if (path / CIFAR_FOLDER).is_dir() or (path.name == CIFAR_FOLDER and (path / "batches.meta").exists()):
            return "cifar"
        return "folder"
    if tarfile.is_tarfile(path):
        return "tar"
    raise DatasetError(f"dataset path {str(path)!r} is neither a folder nor a tar archive "
                       "(.tar, .tar.gz, .tgz)")


def _cifar_root(path: Path) -> Path:
    return path.parent if path.name == CIFAR_FOLDER and not (path / CIFAR_FOLDER).is_dir() else path


def _describe(path: Path) -> str:
    try:
        kind = _source_kind(path)
    except DatasetError:
        kind = "?"
    return {"cifar": "torchvision CIFAR-10 root", "tar": "image-folder tarball",
            "folder": "image-folder tree"}.get(kind, "dataset") + f" {path}"


# ----------------------------------------------------------------------------------------------------
# Content hashes
# ----------------------------------------------------------------------------------------------------


def _content_hash(path: Path, kind: str, cache_dir: Path) -> str:
    if kind == "tar":
        return _file_sha256(path)
    if kind == "cifar":
        folder = _cifar_root(path) / CIFAR_FOLDER
        files = [name for name in CIFAR_FILES if (folder / name).is_file()]
        if not files:
            raise DatasetError(f"{folder} holds none of the CIFAR-10 batch files ({', '.join(CIFAR_FILES)})")
        return _memoised_hash(folder, files, cache_dir)
    layout = _layout(_walk_folder(path), f"folder {path}")
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
    _atomic_write(memo, lambda f: f.write(digest.encode()))
    return digest


# ----------------------------------------------------------------------------------------------------
# Image-folder layout (shared by folders and tarballs)
# ----------------------------------------------------------------------------------------------------


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass
class _Layout:
    prefix: str  # "" or "cifar10/" etc.: where train/ sits inside the source
    test_split: str  # "test" or "val"
    classes: list[str]
    train: list[tuple[str, int]]  # (relative path inside the source, label), sorted by (label, path)
    test: list[tuple[str, int]]

    def all_files(self) -> list[str]:
        return [rel for rel, _ in self.train] + [rel for rel, _ in self.test]


def _layout(entries: Iterable[tuple[str, bool]], where: str) -> _Layout:
    """Find train/ and test/ (or val/) among (relative posix path, is_dir) entries and validate them."""
    exts = _image_extensions()
    dirs: set[tuple[str, ...]] = set()
    files: list[tuple[str, ...]] = []
    for name, is_dir in entries:
        parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", ".", "/"))
        if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        for i in range(1, len(parts)):
            dirs.add(parts[:i])
        if is_dir:
            dirs.add(parts)
        else:
            files.append(parts)

    expected = "expected train/<class>/<image> and test/<class>/<image> (or val/<class>/<image>)"
    candidates = {d[:-1] for d in dirs if d[-1] == "train"}
    if not candidates:
        raise DatasetError(f"{where}: no train/ folder found; {expected}")
    depth = min(len(c) for c in candidates)
    top = sorted(c for c in candidates if len(c) == depth)
    if len(top) > 1:
        raise DatasetError(f"{where}: several train/ folders at the same depth "
                           f"({', '.join('/'.join(c + ('train',)) for c in top)}); point at one of them")
    prefix = top[0]
    pfx = "".join(p + "/" for p in prefix)
    test_split = next((s for s in TEST_SPLITS if prefix + (s,) in dirs), None)
    if test_split is None:
        raise DatasetError(f"{where}: no test/ or val/ folder next to {pfx}train/; {expected}")

    def split_classes(split: str) -> dict[str, list[str]]:
        base = prefix + (split,)
        depth = len(base)
        out: dict[str, list[str]] = {d[depth]: [] for d in dirs if len(d) == depth + 1 and d[:-1] == base}
        for f in files:
            if len(f) >= depth + 2 and f[:depth] == base and PurePosixPath(f[-1]).suffix.lower() in exts:
                out[f[depth]].append("/".join(f))
        if not out:
            raise DatasetError(f"{where}: {pfx}{split}/ has no class folders; {expected}")
        for cls in sorted(out):
            if not out[cls]:
                raise DatasetError(f"{where}: class {cls!r} in {pfx}{split}/ has no images")
        return out

    train = split_classes("train")
    test = split_classes(test_split)
    if set(train) != set(test):
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise DatasetError(f"{where}: class folders differ between {pfx}train/ and {pfx}{test_split}/: "
                           f"only in train/: {only_train}; only in {test_split}/: {only_test}")
    classes = sorted(train)

    def labelled(split: dict[str, list[str]]) -> list[tuple[str, int]]:
        return [(rel, label) for label, cls in enumerate(classes) for rel in sorted(split[cls])]

    return _Layout(prefix=pfx, test_split=test_split, classes=classes, train=labelled(train),
                   test=labelled(test))


def _walk_folder(root: Path) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        out.extend((rel_dir + d, True) for d in dirnames)
        out.extend((rel_dir + f, False) for f in sorted(filenames))
    return out


# ----------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------


Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def _decode_image(data: bytes, name: str, size: int, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")  # forces a full decode
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except Exception as e:
        raise DatasetError(f"{where}: cannot read image {name!r}: {type(e).__name__}: {e}") from e


def _fill(items: list[tuple[str, int]], read: Callable[[str], bytes], size: int,
          where: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(items), size, size, 3), dtype=np.uint8)
    y = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
    for i, (rel, _) in enumerate(items):
        x[i] = _decode_image(read(rel), rel, size, where)
    return x, y


def _decode_folder(root: Path, size: int) -> Decoded:
    where = f"folder {root}"
    layout = _layout(_walk_folder(root), where)

    def read(rel: str) -> bytes:
        return (root / rel).read_bytes()

    train_x, train_y = _fill(layout.train, read, size, where)
    test_x, test_y = _fill(layout.test, read, size, where)
    return train_x, train_y, test_x, test_y, layout.classes


def _decode_tar(path: Path, size: int) -> Decoded:
    where = f"tarball {path}"
    try:
        with tarfile.open(path, "r:*") as tf:
            members = tf.getmembers()  # one pass over the archive; the read pass below goes forward
            layout = _layout(((m.name, m.isdir()) for m in members if m.isdir() or m.isfile()), where)
            slots: dict[str, tuple[int, int]] = {}  # normalised name -> (split 0/1, index)
            for split, items in enumerate((layout.train, layout.test)):
                for i, (rel, _) in enumerate(items):
                    slots[rel] = (split, i)
            out = [np.empty((len(layout.train), size, size, 3), np.uint8),
                   np.empty((len(layout.test), size, size, 3), np.uint8)]
            seen = 0
            for m in members:
                if not m.isfile():
                    continue
                rel = "/".join(p for p in PurePosixPath(m.name).parts if p not in ("", ".", "/"))
                slot = slots.pop(rel, None)  # pop: a duplicated member name counts once
                if slot is None:
                    continue
                f = tf.extractfile(m)
                if f is None:
                    raise DatasetError(f"{where}: cannot read member {m.name!r}")
                out[slot[0]][slot[1]] = _decode_image(f.read(), m.name, size, where)
                seen += 1
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{where}: cannot read the archive: {type(e).__name__}: {e}") from e
    if slots:
        raise DatasetError(f"{where}: members listed but not read: {sorted(slots)[:5]}")
    train_y = np.array([label for _, label in layout.train], dtype=np.int64)
    test_y = np.array([label for _, label in layout.test], dtype=np.int64)
    return out[0], train_y, out[1], test_y, layout.classes


def _decode_cifar_root(root: Path, size: int) -> Decoded:
    import torchvision

    arrays = []
    classes: list[str] = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
        except (RuntimeError, OSError, pickle.UnpicklingError, KeyError, ValueError) as e:
            raise DatasetError(f"torchvision CIFAR-10 root {root}: {root / CIFAR_FOLDER} is missing, "
                               f"incomplete or does not match CIFAR-10's checksums ({type(e).__name__}: {e})"
                               ) from e
        x = np.ascontiguousarray(ds.data, dtype=np.uint8)  # (N, 32, 32, 3)
        if x.shape[1:3] != (size, size):
            x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
                          for im in x]) if len(x) else np.empty((0, size, size, 3), np.uint8)
        arrays += [x, np.asarray(ds.targets, dtype=np.int64)]
        classes = list(ds.classes)
    return arrays[0], arrays[1], arrays[2], arrays[3], classes


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# The packed file
# ----------------------------------------------------------------------------------------------------


def _atomic_write(target: Path, write: Callable) -> None:
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


def _atomic_save(payload: dict, target: Path) -> None:
    _atomic_write(target, lambda f: torch.save(payload, f))


def _read_packed(path: Path) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(data, dict) or data.get("format") != PACK_FORMAT:
        raise ValueError(f"{path} is not a packed dataset of format {PACK_FORMAT}")
    for split in ("train", "test"):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or y.dtype != torch.int64 \
                or y.shape != (x.shape[0],):
            raise ValueError(f"{path}: {split} tensors have unexpected shapes or dtypes")
    return data


def _check_subset(y: torch.Tensor, n: int, classes: list[str], setting: str, split: str) -> None:
    per_class = n // len(classes)
    if per_class < 1:
        raise DatasetError(f"data.{setting}={n} is smaller than the number of classes ({len(classes)})")
    counts = torch.bincount(y, minlength=len(classes))
    short = [f"{classes[c]!r} has {int(counts[c])}" for c in range(len(classes)) if counts[c] < per_class]
    if short:
        raise DatasetError(f"data.{setting}={n} needs {per_class} {split} images per class, but "
                           + ", ".join(short))
