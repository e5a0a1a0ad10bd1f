"""Dataset sources: where a `DataSpec` points, what kind of source that is, and decoding it to uint8 arrays.

Three kinds of source are understood:

- a torchvision CIFAR-10 root (a folder holding `cifar-10-batches-py/`), read with torchvision's own
  reader (which checks the md5 of every batch file);
- an image-folder tree: `train/<class>/<image>` plus `test/<class>/<image>` (or `val/...`), any
  format PIL reads, any resolution;
- the same tree inside a tarball (.tar, .tar.gz, .tgz, ...), read in place with `tarfile`. The tree
  may sit under a top-level folder (`cifar10/train/...`) or not.

Every image is converted to RGB and resized (PIL bilinear) to `image_size` x `image_size`. Labels follow
the sorted class-folder names (for CIFAR-10 this is torchvision's order: airplane, automobile, bird, cat,
deer, dog, frog, horse, ship, truck). Nothing here writes a file: caching the decoded arrays is
`packing`'s job.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from worker.engine.config import DataSpec

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta")
TEST_SPLITS = ("test", "val")
HOW_TO_POINT = ("set HPARENA_DATASET_PATH (or the competition's data.path) to a local copy: an image-folder "
                "tarball such as cifar10-jpg.tar.gz, an image-folder tree (train/<class>/, test/<class>/), "
                "or a torchvision root containing cifar-10-batches-py/")


class DatasetError(ValueError):
    """The dataset is missing or malformed; the message names what and where."""


# ----------------------------------------------------------------------------------------------------
# Resolving a spec to a source
# ----------------------------------------------------------------------------------------------------


def resolve_source(spec: DataSpec, cache_dir: Path, *, download: bool,
                   default_path: str | Path | None) -> Path:
    """The path of the source `spec` names; for cifar10 without a path, see `load_dataset` for the order."""
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


def source_kind(path: Path) -> str:
    """The kind of source at `path`: cifar (a torchvision root), folder (an image-folder tree) or tar."""
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


def cifar_root(path: Path) -> Path:
    """The folder above `cifar-10-batches-py/`, whichever of the two `path` names."""
    return path.parent if path.name == CIFAR_FOLDER and not (path / CIFAR_FOLDER).is_dir() else path


def describe(path: Path) -> str:
    try:
        kind = source_kind(path)
    except DatasetError:
        kind = "?"
    return {"cifar": "torchvision CIFAR-10 root", "tar": "image-folder tarball",
            "folder": "image-folder tree"}.get(kind, "dataset") + f" {path}"


# ----------------------------------------------------------------------------------------------------
# Image-folder layout (shared by folders and tarballs)
# ----------------------------------------------------------------------------------------------------


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass
class Layout:
    prefix: str  # "" or "cifar10/" etc.: where train/ sits inside the source
    test_split: str  # "test" or "val"
    classes: list[str]
    train: list[tuple[str, int]]  # (relative path inside the source, label), sorted by (label, path)
    test: list[tuple[str, int]]

    def all_files(self) -> list[str]:
        return [rel for rel, _ in self.train] + [rel for rel, _ in self.test]


def find_layout(entries: Iterable[tuple[str, bool]], where: str) -> Layout:
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

    return Layout(prefix=pfx, test_split=test_split, classes=classes, train=labelled(train),
                  test=labelled(test))


def walk_folder(root: Path) -> list[tuple[str, bool]]:
    """(relative posix path, is_dir) of everything under `root`, hidden folders skipped, in sorted order."""
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


Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]  # train x, y, test x, y, classes


def decode(path: Path, kind: str, size: int) -> Decoded:
    """Every image of the source at `path` (of `source_kind` `kind`) as uint8 (N, size, size, 3) arrays."""
    if kind == "cifar":
        return _decode_cifar_root(cifar_root(path), size)
    if kind == "tar":
        return _decode_tar(path, size)
    return _decode_folder(path, size)


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
    layout = find_layout(walk_folder(root), where)

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
            layout = find_layout(((m.name, m.isdir()) for m in members if m.isdir() or m.isfile()), where)
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
