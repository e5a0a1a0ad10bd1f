"""worker.engine.data on real files: the shared CIFAR-10 tarball, generated image folders and tarballs,
and a torchvision-format CIFAR root read by torchvision's own reader. No mocks."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tests.synthetic import synthetic_dataset
from worker.engine.config import DataSpec
from worker.engine.data import Dataset, DatasetError, load_dataset
from worker.engine.packing import pack_source
from worker.engine.subsets import balanced_subset

REAL_TAR = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifar10-jpg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
needs_real = pytest.mark.skipif(not REAL_TAR.exists(), reason=f"{REAL_TAR} not present")


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def small_real_tar(tmp_path_factory) -> Path:
    """A .tar.gz of the first 20 train and 6 test images of every class of the real tarball, under a
    top-level folder (so the prefix handling is exercised on real JPEGs)."""
    if not REAL_TAR.exists():
        pytest.skip(f"{REAL_TAR} not present")
    out = tmp_path_factory.mktemp("small-real") / "cifar10-small.tar.gz"
    keep = {"train": 20, "test": 6}
    counts: Counter = Counter()
    with tarfile.open(REAL_TAR, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for m in src:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 3 or counts[parts[0], parts[1]] >= keep[parts[0]]:
                continue
            counts[parts[0], parts[1]] += 1
            data = src.extractfile(m).read()
            info = tarfile.TarInfo("cifar10-small/" + m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    assert len(counts) == 20
    return out


@pytest.fixture(scope="session")
def full_real_cache(tmp_path_factory) -> Path:
    """A cache dir holding the full real tarball packed at 32px (packed once per session)."""
    if not REAL_TAR.exists():
        pytest.skip(f"{REAL_TAR} not present")
    cache = tmp_path_factory.mktemp("full-real-cache")
    pack_source(REAL_TAR, 32, cache)
    return cache


def _image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=(h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((10, 10, 1), dtype=np.uint8))[:h, :w]  # blocky, so resizing is visible
    return Image.fromarray(arr, "RGB").convert(mode)


def make_tree(root: Path, classes=("cat", "dog", "bird"), n_train=4, n_test=2, size=(300, 260),
              test_dir="test") -> dict[str, Image.Image]:
    """Write train/<class>/ and <test_dir>/<class>/ with images of mixed formats and modes."""
    written = {}
    formats = [("png", "RGB"), ("jpg", "RGB"), ("png", "L"), ("png", "RGBA"), ("bmp", "RGB")]
    i = 0
    for split, n in (("train", n_train), (test_dir, n_test)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                ext, mode = formats[i % len(formats)]
                img = _image(size, seed=i, mode=mode)
                rel = f"{split}/{cls}/{k:03d}.{ext}"
                img.save(root / rel)
                written[rel] = Image.open(root / rel).convert("RGB")
                i += 1
    return written


def make_tar(src: Path, out: Path, prefix: str = "") -> Path:
    mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(out, mode) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=prefix + p.relative_to(src).as_posix(), recursive=False)
    return out


# ----------------------------------------------------------------------------------------------------
# The real CIFAR-10 tarball
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # reads the whole real archive
@needs_real
def test_small_real_tarball_loads_and_second_load_hits_cache(small_real_tar, tmp_path):
    spec = DataSpec(name="cifar10", path=str(small_real_tar), train_subset=100, test_subset=30)
    t0 = time.perf_counter()
    ds = load_dataset(spec, tmp_path)
    first = time.perf_counter() - t0

    assert ds.classes == CIFAR_CLASSES and ds.num_classes == 10 and ds.image_size == 32
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (30, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.is_contiguous() and ds.train_x.device.type == "cpu"
    assert torch.bincount(ds.train_y).tolist() == [10] * 10
    assert torch.bincount(ds.test_y).tolist() == [3] * 10
    assert ds.content_hash == hashlib.sha256(small_real_tar.read_bytes()).hexdigest()

    # the first airplane in train is train/airplane/0000.jpg, decoded the plain PIL way
    with tarfile.open(small_real_tar) as tf:
        ref = Image.open(tf.extractfile("cifar10-small/train/airplane/0000.jpg")).convert("RGB")
    assert torch.equal(ds.train_x[0], torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    # and the first truck in test is test/truck/0000.jpg
    with tarfile.open(small_real_tar) as tf:
        ref = Image.open(tf.extractfile("cifar10-small/test/truck/0000.jpg")).convert("RGB")
    first_truck = int(torch.nonzero(ds.test_y == 9)[0])
    assert torch.equal(ds.test_x[first_truck], torch.from_numpy(np.array(ref)).permute(2, 0, 1))

    packed = list(tmp_path.glob("packed-*-32px.pt"))
    assert [p.name for p in packed] == [f"packed-{ds.content_hash[:16]}-32px.pt"]
    mtime = packed[0].stat().st_mtime_ns
    t0 = time.perf_counter()
    again = load_dataset(spec, tmp_path)
    second = time.perf_counter() - t0
    assert packed[0].stat().st_mtime_ns == mtime  # not rewritten
    assert second < first and second < 1.0
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


@needs_real
@pytest.mark.slow
def test_full_real_tarball(full_real_cache):
    packed = full_real_cache / "packed-45b041e867f5a40f-32px.pt"  # sha256 from the datasets README
    assert packed.exists()
    t0 = time.perf_counter()
    ds = load_dataset(DataSpec(name="cifar10", path=str(REAL_TAR)), full_real_cache)
    assert time.perf_counter() - t0 < 1.0
    assert ds.classes == CIFAR_CLASSES
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10

    # through the caller's default path (spec without a path), with subsets
    sub = load_dataset(DataSpec(name="cifar10", train_subset=1000, test_subset=500), full_real_cache,
                       default_path=REAL_TAR, download=False)
    assert sub.train_x.shape == (1000, 3, 32, 32) and sub.test_x.shape == (500, 3, 32, 32)
    assert torch.bincount(sub.train_y).tolist() == [100] * 10
    assert torch.equal(sub.train_x[:100], ds.train_x[:100])  # first 100 airplanes, in order
    assert list(full_real_cache.glob("packed-*.pt")) == [packed]


# ----------------------------------------------------------------------------------------------------
# Generated image folders and tarballs (high resolution, mixed formats)
# ----------------------------------------------------------------------------------------------------


def test_high_res_folder_is_resized(tmp_path):
    root = tmp_path / "tree"
    written = make_tree(root)
    ds = load_dataset(DataSpec(name="imagefolder", path=str(root), image_size=64), tmp_path / "cache")
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.train_x.shape == (12, 3, 64, 64) and ds.test_x.shape == (6, 3, 64, 64)
    assert ds.train_x.dtype == torch.uint8 and ds.image_size == 64
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    # sample 0 is train/bird/000.*: PIL's bilinear resize of that image
    rel = sorted(r for r in written if r.startswith("train/bird/"))[0]
    expected = np.asarray(written[rel].resize((64, 64), Image.Resampling.BILINEAR))
    assert torch.equal(ds.train_x[0], torch.from_numpy(np.array(expected)).permute(2, 0, 1))


@pytest.mark.parametrize("name,prefix", [("tree.tar.gz", "mydata/"), ("tree.tar", ""), ("tree.tgz", "a/b/")])
def test_high_res_tarball_matches_folder(tmp_path, name, prefix):
    root = tmp_path / "tree"
    make_tree(root)
    tar = make_tar(root, tmp_path / name, prefix=prefix)
    from_folder = load_dataset(DataSpec(name="imagefolder", path=str(root), image_size=64), tmp_path / "c1")
    from_tar = load_dataset(DataSpec(name="imagefolder", path=str(tar), image_size=64), tmp_path / "c2")
    assert from_tar.classes == from_folder.classes
    assert from_tar.train_x.shape == (12, 3, 64, 64)
    assert torch.equal(from_tar.train_x, from_folder.train_x)
    assert torch.equal(from_tar.test_x, from_folder.test_x)
    assert torch.equal(from_tar.train_y, from_folder.train_y)


def test_val_folder_and_already_sized_images(tmp_path):
    root = tmp_path / "tree"
    written = make_tree(root, size=(48, 48), test_dir="val")
    ds = load_dataset(DataSpec(name="imagefolder", path=str(root), image_size=48), tmp_path / "cache")
    assert ds.test_x.shape == (6, 3, 48, 48)
    rel = sorted(r for r in written if r.startswith("val/bird/"))[0]
    assert torch.equal(ds.test_x[0], torch.from_numpy(np.array(written[rel])).permute(2, 0, 1))


def test_folder_content_change_repacks(tmp_path):
    root = tmp_path / "tree"
    make_tree(root, size=(40, 40))
    cache = tmp_path / "cache"
    spec = DataSpec(name="imagefolder", path=str(root), image_size=32)
    before = load_dataset(spec, cache)
    assert load_dataset(spec, cache).content_hash == before.content_hash  # memoised, same key
    target = next(root.glob("train/cat/*.png"))
    _image((40, 40), seed=999).save(target)
    after = load_dataset(spec, cache)
    assert after.content_hash != before.content_hash
    assert len(list(cache.glob("packed-*.pt"))) == 2


def test_damaged_cache_file_is_repacked(tmp_path):
    root = tmp_path / "tree"
    make_tree(root, size=(40, 40))
    spec = DataSpec(name="imagefolder", path=str(root), image_size=32)
    good = load_dataset(spec, tmp_path / "cache")
    packed = next((tmp_path / "cache").glob("packed-*.pt"))
    # damage it the way a crash would leave it, by replacing the file: `good` still memory-maps the old
    # one, and truncating a mapped file in place would crash this process (SIGBUS) on the next read
    (tmp_path / "damaged").write_bytes(b"not a torch file")
    os.replace(tmp_path / "damaged", packed)
    again = load_dataset(spec, tmp_path / "cache")
    assert torch.equal(again.train_x, good.train_x)


def test_concurrent_packing_leaves_one_valid_file(tmp_path):
    root = tmp_path / "tree"
    make_tree(root, size=(64, 64), n_train=8)
    cache = tmp_path / "cache"
    results, errors = [], []

    def pack():
        try:
            results.append(pack_source(root, 32, cache))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=pack) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in cache.iterdir() if p.suffix == ".pt"] == [results[0].name]
    assert not list(cache.glob(".*tmp"))
    assert load_dataset(DataSpec(name="imagefolder", path=str(root)), cache).train_x.shape == (24, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------
# torchvision-format CIFAR-10 root, read by torchvision's own reader
# ----------------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_cifar_root(root: Path, per_batch: int = 20) -> dict[str, np.ndarray]:
    """Write cifar-10-batches-py/ the way the official archive stores it (latin1-readable pickles of
    dicts with 'data' (N, 3072) uint8 in CHW order and 'labels'; batches.meta with 'label_names')."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(per_batch) % 10]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}, f, protocol=2)
        arrays[name] = data
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f,
                    protocol=2)
    return arrays


@pytest.fixture
def fake_cifar_checksums(monkeypatch):
    """Point torchvision's CIFAR10 checksum table at the fake files' md5s. Everything else, reading
    included, is torchvision's own code; the official md5s cannot be matched by made-up batches."""

    def apply(root: Path) -> None:
        folder = root / "cifar-10-batches-py"
        cls = torchvision.datasets.CIFAR10
        monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "batches.meta")})

    return apply


def test_torchvision_cifar_root(tmp_path, fake_cifar_checksums):
    root = tmp_path / "cifar"
    arrays = make_cifar_root(root)
    fake_cifar_checksums(root)
    ds = load_dataset(DataSpec(name="cifar10", path=str(root)), tmp_path / "cache")
    assert ds.classes == CIFAR_CLASSES
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert torch.equal(ds.train_x[0], torch.from_numpy(arrays["data_batch_1"][0].reshape(3, 32, 32)))
    assert torch.equal(ds.test_x[-1], torch.from_numpy(arrays["test_batch"][-1].reshape(3, 32, 32)))
    assert ds.train_y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert "torchvision CIFAR-10 root" in ds.source

    # resized
    spec = DataSpec(name="cifar10", path=str(root), image_size=40, train_subset=50)
    big = load_dataset(spec, tmp_path / "cache")
    assert big.train_x.shape == (50, 3, 40, 40)


def test_cifar_root_in_cache_dir_comes_first(tmp_path, fake_cifar_checksums):
    cache = tmp_path / "cache"
    make_cifar_root(cache)
    fake_cifar_checksums(cache)
    other = tmp_path / "tree"
    make_tree(other, size=(32, 32))
    # the caller's default path is ignored while cache_dir holds a torchvision copy
    ds = load_dataset(DataSpec(name="cifar10"), cache, default_path=other, download=False)
    assert ds.classes == CIFAR_CLASSES and ds.train_x.shape == (100, 3, 32, 32)


def test_fake_cifar_root_fails_torchvision_checksums(tmp_path):
    root = tmp_path / "cifar"
    make_cifar_root(root)
    with pytest.raises(DatasetError, match="checksums"):
        load_dataset(DataSpec(name="cifar10", path=str(root)), tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------
# Resolution without a path, and the download path up to the network
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def socket_timeout():
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    yield
    socket.setdefaulttimeout(old)


def test_download_failure_is_a_dataset_error(tmp_path, socket_timeout):
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="downloading CIFAR-10 .* failed") as info:
        load_dataset(DataSpec(name="cifar10"), tmp_path / "cache", download=True, default_path=None)
    assert "HPARENA_DATASET_PATH" in str(info.value)
    assert time.perf_counter() - t0 < 60


def test_no_download_and_missing_default(tmp_path):
    with pytest.raises(DatasetError, match="downloading is disabled") as info:
        load_dataset(DataSpec(name="cifar10"), tmp_path, download=False, default_path=tmp_path / "nope.tgz")
    assert "nope.tgz" in str(info.value) and "HPARENA_DATASET_PATH" in str(info.value)


def test_default_path_used_when_no_path(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, size=(32, 32))
    tar = make_tar(tree, tmp_path / "d.tgz")
    ds = load_dataset(DataSpec(name="cifar10"), tmp_path / "cache", default_path=tar, download=False)
    assert ds.classes == ["bird", "cat", "dog"] and "d.tgz" in ds.source


# ----------------------------------------------------------------------------------------------------
# Malformed sources
# ----------------------------------------------------------------------------------------------------


def _no_train(root: Path) -> None:
    make_tree(root, size=(16, 16))
    (root / "train").rename(root / "training")


def _no_test(root: Path) -> None:
    make_tree(root, size=(16, 16))
    (root / "test").rename(root / "testing")


def _empty_class(root: Path) -> None:
    make_tree(root, size=(16, 16))
    for p in (root / "train" / "cat").iterdir():
        p.unlink()


def _class_without_images(root: Path) -> None:
    make_tree(root, size=(16, 16))
    for p in (root / "train" / "cat").iterdir():
        p.unlink()
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def _corrupt_image(root: Path) -> None:
    make_tree(root, size=(16, 16))
    (root / "train" / "dog" / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")


def _truncated_image(root: Path) -> None:
    make_tree(root, size=(64, 64))
    p = root / "test" / "bird" / "000.jpg"
    p.write_bytes(p.read_bytes()[:200])


def _class_mismatch(root: Path) -> None:
    make_tree(root, size=(16, 16))
    (root / "test" / "cat").rename(root / "test" / "kat")


def _no_classes_in_test(root: Path) -> None:
    make_tree(root, size=(16, 16))
    for d in (root / "test").iterdir():
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


MALFORMED = [  # {p}: where the tree sits inside the source ("" for the folder, "top/" in the tarball)
    (_no_train, r"no train/ folder found"),
    (_no_test, r"no test/ or val/ folder next to {p}train/"),
    (_empty_class, r"class 'cat' in {p}train/ has no images"),
    (_class_without_images, r"class 'cat' in {p}train/ has no images"),
    (_corrupt_image, r"cannot read image '{p}train/dog/001.jpg'"),
    (_truncated_image, r"cannot read image '{p}test/bird/000.jpg'"),
    (_class_mismatch,
     r"differ between {p}train/ and {p}test/: only in train/: \['cat'\]; only in test/: \['kat'\]"),
    (_no_classes_in_test, r"{p}test/ has no class folders"),
]


@pytest.mark.parametrize("build,message", MALFORMED, ids=[b.__name__.strip("_") for b, _ in MALFORMED])
@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tarball"])
def test_malformed(tmp_path, build, message, as_tar):
    root = tmp_path / "tree"
    build(root)
    path = make_tar(root, tmp_path / "tree.tar.gz", prefix="top/") if as_tar else root
    with pytest.raises(DatasetError, match=message.format(p="top/" if as_tar else "")):
        load_dataset(DataSpec(name="imagefolder", path=str(path)), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("packed-*"))


def test_path_not_found(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(DataSpec(name="imagefolder", path=str(tmp_path / "missing")), tmp_path)


def test_not_a_tarball(tmp_path):
    bogus = tmp_path / "data.tar.gz"
    bogus.write_bytes(b"definitely not gzip" * 100)
    with pytest.raises(DatasetError, match="neither a folder nor a tar archive"):
        load_dataset(DataSpec(name="imagefolder", path=str(bogus)), tmp_path / "cache")


def test_imagefolder_needs_a_path(tmp_path):
    with pytest.raises(DatasetError, match="needs data.path"):
        load_dataset(DataSpec(name="imagefolder"), tmp_path)


def test_subset_larger_than_a_class(tmp_path):
    root = tmp_path / "tree"
    make_tree(root, size=(16, 16))
    with pytest.raises(DatasetError, match=r"train_subset=30 needs 10 train images per class"):
        load_dataset(DataSpec(name="imagefolder", path=str(root), train_subset=30), tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------
# balanced_subset and synthetic_dataset
# ----------------------------------------------------------------------------------------------------


def test_balanced_subset_first_per_class_in_order():
    y = torch.tensor([2, 0, 0, 1, 2, 1, 0, 2, 1, 1, 0, 2])
    x = torch.arange(len(y)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.uint8)
    sx, sy = balanced_subset(x, y, 7, 3)  # 7 // 3 = 2 per class
    assert sy.tolist() == [2, 0, 0, 1, 2, 1]
    assert sx[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    sx, sy = balanced_subset(x, y, 12, 3)
    assert sy.tolist() == y.tolist()
    assert balanced_subset(x, y, 3, 3)[1].tolist() == [2, 0, 1]
    with pytest.raises(DatasetError):
        balanced_subset(x, y, 15, 3)  # 5 per class, only 4 of each
    with pytest.raises(DatasetError):
        balanced_subset(x, y, 2, 3)


def test_synthetic_dataset_is_deterministic_and_learnable():
    ds = synthetic_dataset(400, 200, num_classes=4, image_size=16, seed=3)
    assert isinstance(ds, Dataset)
    assert ds.train_x.shape == (400, 3, 16, 16) and ds.train_x.dtype == torch.uint8
    assert ds.test_y.dtype == torch.int64 and torch.bincount(ds.train_y).tolist() == [100] * 4
    assert ds.num_classes == 4 and ds.image_size == 16
    again = synthetic_dataset(400, 200, num_classes=4, image_size=16, seed=3)
    assert torch.equal(again.train_x, ds.train_x) and again.content_hash == ds.content_hash
    assert not torch.equal(synthetic_dataset(400, 200, 4, 16, seed=4).train_x, ds.train_x)
    # a nearest-class-mean classifier on mean colour alone already separates the classes
    feats = lambda x: x.float().mean(dim=(2, 3))  # noqa: E731
    means = torch.stack([feats(ds.train_x[ds.train_y == c]).mean(0) for c in range(4)])
    pred = torch.cdist(feats(ds.test_x), means).argmin(1)
    assert (pred == ds.test_y).float().mean() > 0.9
