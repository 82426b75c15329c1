"""Dataset loading: idx parsing and its errors, the real datasets, glyphs, stratified subsets."""

import gzip
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import data
from ddpm.data import (
    DataError,
    class_histogram,
    load_dataset,
    make_glyphs,
    read_idx,
    stratified_subset,
)

FASHION = data.DEBIAN_ROOT / "fashion-mnist"
MNIST_T10K = Path(__file__).resolve().parents[2] / "shared/data/mnist-t10k"


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, dims=None) -> Path:
    """Write uint8 `array` as an idx file (gzipped if `path` ends in .gz); header overridable."""
    magic = magic if magic is not None else 0x800 + array.ndim
    dims = dims if dims is not None else array.shape
    raw = struct.pack(f">I{len(dims)}I", magic, *dims) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_idx_dataset(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> Path:
    """The four idx files of a tiny random MNIST-like dataset in `folder`."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return folder


@pytest.fixture
def no_debian_no_download(monkeypatch, tmp_path):
    """Hide the Debian datasets and make the download fail as it does offline."""
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path / "no-debian")

    def offline(name, dest):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nmore detail")

    monkeypatch.setattr(data, "_download", offline)


# ---- idx files ----

@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([7, 2, 1, 0, 4], np.uint8)
    got_images = read_idx(write_idx(tmp_path / f"img{suffix}", images))
    got_labels = read_idx(write_idx(tmp_path / f"lab{suffix}", labels))
    assert got_images.dtype == torch.uint8 and torch.equal(got_images, torch.from_numpy(images))
    assert torch.equal(got_labels, torch.from_numpy(labels))


def test_truncated_gzip_names_file(tmp_path):
    good = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    bad = tmp_path / "cut-images-idx3-ubyte.gz"
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(DataError, match="cut-images-idx3-ubyte.gz"):
        read_idx(bad)


def test_not_gzip_names_file(tmp_path):
    bad = tmp_path / "plain-labels-idx1-ubyte.gz"
    bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="plain-labels-idx1-ubyte.gz"):
        read_idx(bad)


def test_wrong_magic_names_file(tmp_path):
    bad = write_idx(tmp_path / "float-images.gz", np.zeros((2, 3, 3)), magic=0x00000D03)
    with pytest.raises(DataError, match=r"float-images.gz.*0x00000d03"):
        read_idx(bad)


@pytest.mark.parametrize("dims", [(3, 28, 28), (2, 28, 27)])
def test_wrong_counts_names_file(tmp_path, dims):
    bad = write_idx(tmp_path / "short-images", np.zeros((2, 28, 28)), dims=dims)
    with pytest.raises(DataError, match="short-images"):
        read_idx(bad)


def test_mismatched_split_names_files(tmp_path, no_debian_no_download):
    folder = write_idx_dataset(tmp_path / "ds")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(3))  # 10 test images, 3 labels
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", root=folder)


# ---- lookup of real datasets ----

@pytest.mark.parametrize("gz", [True, False])
def test_raw_dir_source(tmp_path, gz, no_debian_no_download):
    write_idx_dataset(tmp_path / "raw" / "mnist", gz=gz)
    ds = load_dataset("mnist", raw_dir=tmp_path / "raw")
    assert ds.train_images.shape == (20, 1, 28, 28) and ds.test_images.shape == (10, 1, 28, 28)
    assert ds.train_labels.dtype == torch.int64 and ds.class_names[3] == "3"


def test_torchvision_layout_source(tmp_path, no_debian_no_download):
    write_idx_dataset(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    ds = load_dataset("fashion_mnist", root=tmp_path / "tv", raw_dir=tmp_path / "raw")
    assert len(ds.train_labels) == 20 and ds.class_names[9] == "Ankle boot"


def test_missing_dataset_lists_places_tried(tmp_path, no_debian_no_download):
    (tmp_path / "raw" / "mnist").mkdir(parents=True)
    write_idx(tmp_path / "raw" / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", raw_dir=tmp_path / "raw")
    msg = str(err.value)
    assert "\n" not in msg
    assert "root (not set)" in msg
    assert f"{tmp_path / 'raw' / 'mnist'}/ (missing train-images-idx3-ubyte[.gz]" in msg
    assert "train-labels-idx1-ubyte[.gz]" not in msg  # that one is present
    assert f"{tmp_path / 'no-debian' / 'mnist'}/ (no such folder)" in msg
    assert "RuntimeError: Error downloading train-images-idx3-ubyte.gz" in msg


def test_without_raw_dir_only_root_and_debian_are_tried_and_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path / "no-debian")
    monkeypatch.setattr(data, "_download", lambda name, dest: pytest.fail(f"downloaded into {dest}"))
    with pytest.raises(DataError) as err:
        load_dataset("mnist")
    assert str(err.value) == (f"dataset mnist not found; tried root (not set); {tmp_path / 'no-debian' / 'mnist'}/ "
                              "(no such folder). fix: point `root` at a folder holding them")


def test_fashion_hint_mentions_apt(tmp_path, no_debian_no_download):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", raw_dir=tmp_path / "raw")


def test_cifar_corrupt_batches_name_folder(tmp_path, no_debian_no_download):
    batches = tmp_path / "c" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in data.CIFAR_FILES:
        (batches / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path / "c")


def write_cifar(batches: Path, per_batch: int) -> None:
    """A tiny dataset in the CIFAR-10 python pickle layout; image i is filled with the value i."""
    batches.mkdir(parents=True)
    for k, name in enumerate(data.CIFAR_FILES[:-1]):
        values = np.arange(k * per_batch, (k + 1) * per_batch, dtype=np.uint8)
        pixels = np.repeat(values, 3 * 32 * 32).reshape(per_batch, 3072)
        pixels[:, :1024] = 0  # red plane dark, so the channel order is checked too
        batch = {"data": pixels, "labels": [int(v) % 10 for v in values]}
        (batches / name).write_bytes(pickle.dumps(batch))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": list(data.CLASS_NAMES["cifar10"])}))


def test_cifar_batches_load_as_nchw(tmp_path, monkeypatch, no_debian_no_download):
    write_cifar(tmp_path / "c" / "cifar-10-batches-py", per_batch=2)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)  # not real files
    ds = load_dataset("cifar10", root=tmp_path / "c" / "cifar-10-batches-py")
    assert ds.train_images.shape == (10, 3, 32, 32) and ds.test_images.shape == (2, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.is_contiguous()
    assert (ds.train_images[:, 0] == 0).all() and (ds.train_images[7, 1:] == 7).all()
    assert ds.test_labels.tolist() == [0, 1] and ds.class_names[0] == "airplane"


def test_unknown_dataset():
    with pytest.raises(DataError, match="glyphs"):
        load_dataset("imagenet")


def test_real_download_fails_fast_offline(tmp_path, monkeypatch):
    """With the network unreachable, the real torchvision download fails quickly into a DataError."""
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path / "no-debian")
    monkeypatch.setattr("socket.getaddrinfo", _no_network)
    start = time.perf_counter()
    with pytest.raises(DataError, match="download into"):
        load_dataset("mnist", raw_dir=tmp_path / "raw")
    assert time.perf_counter() - start < 10


def _no_network(*args, **kwargs):
    raise OSError("network disabled in this test")


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian(tmp_path):
    ds = load_dataset("fashion_mnist", raw_dir=tmp_path / "empty")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert class_histogram(ds.train_labels, 10) == [6000] * 10
    assert class_histogram(ds.test_labels, 10) == [1000] * 10
    assert ds.train_images.dtype == torch.uint8 and int(ds.train_images.max()) == 255


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason="needs shared/data/mnist-t10k beside the checkout")
def test_real_mnist_test_split_via_root(tmp_path):
    for kind, idx in (("images", 3), ("labels", 1)):
        source = MNIST_T10K / f"t10k-{kind}-idx{idx}-ubyte.gz"
        for split in ("train", "t10k"):
            (tmp_path / f"{split}-{kind}-idx{idx}-ubyte.gz").symlink_to(source)
    ds = load_dataset("mnist", root=tmp_path, raw_dir=tmp_path / "raw")
    assert ds.test_images.shape == (10000, 1, 28, 28) and len(ds.test_labels) == 10000
    assert int(ds.test_labels[0]) == 7 and ds.class_names == tuple("0123456789")
    assert sum(class_histogram(ds.test_labels, 10)) == 10000


# ---- glyphs ----

def test_glyphs_deterministic_and_well_formed():
    a, b, c = make_glyphs(50, 20, seed=3), make_glyphs(50, 20, seed=3), make_glyphs(50, 20, seed=4)
    assert a.content_hash() == b.content_hash() != c.content_hash()
    assert a.train_images.shape == (50, 1, 28, 28) and a.test_images.shape == (20, 1, 28, 28)
    assert a.train_images.dtype == torch.uint8 and a.train_labels.dtype == torch.int64
    assert class_histogram(a.train_labels, 10) == [5] * 10
    assert int(a.test_labels.min()) >= 0 and int(a.test_labels.max()) <= 9
    assert (a.train_images.flatten(1).amax(1) > 150).all()  # every image shows a digit
    assert (a.train_images[:, :, 0, :] < 64).all()  # ... that stays mostly inside the frame


def test_glyph_digits_differ_from_each_other():
    """Class means are far apart, so the classes are distinguishable."""
    ds = make_glyphs(500, 0, seed=0)
    x = ds.train_images.float().flatten(1) / 255
    means = torch.stack([x[ds.train_labels == k].mean(0) for k in range(10)])
    nearest = torch.cdist(x, means).argmin(1)
    assert (nearest == ds.train_labels).float().mean() > 0.5


def test_load_dataset_glyphs_defaults():
    ds = load_dataset("glyphs", seed=0)
    assert len(ds.train_labels) == 6000 and len(ds.test_labels) == 1000


# ---- subsets and histograms ----

def test_stratified_subset_balanced_and_ordered():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5 + [3] * 15)
    images = torch.arange(len(labels)).view(-1, 1, 1, 1)
    sub_images, sub_labels = stratified_subset(images, labels, 23, seed=1)
    counts = class_histogram(sub_labels, 4)
    assert sum(counts) == 23 and counts[2] == 5 and max(counts) - min(counts[:2] + counts[3:]) <= 1
    assert torch.equal(labels[sub_images.flatten()], sub_labels)
    assert (sub_images.flatten().diff() > 0).all()  # original order kept
    again, _ = stratified_subset(images, labels, 23, seed=1)
    other, _ = stratified_subset(images, labels, 23, seed=2)
    assert torch.equal(again, sub_images) and not torch.equal(other, sub_images)


@pytest.mark.parametrize("limit", [10, None])
def test_stratified_subset_limit_above_size_or_none_returns_all(limit):
    labels = torch.tensor([1, 0, 1])
    images, out_labels = stratified_subset(torch.zeros(3, 1, 2, 2), labels, limit, seed=0)
    assert len(images) == 3 and torch.equal(out_labels, labels)


def test_class_histogram_rejects_out_of_range():
    assert class_histogram(torch.tensor([0, 2, 2]), 3) == [1, 0, 2]
    with pytest.raises(DataError):
        class_histogram(torch.tensor([0, 3]), 3)
