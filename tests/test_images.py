"""Image folders, class subsets, resizing and channel conversion (ddpm.images) and the prepare stage on them."""

import json
import math
import os
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
import yaml
from helpers import ROOT, make_image_folder
from PIL import Image

from ddpm.data import DataError, ImageData
from ddpm.images import convert, load_image_folder, select_classes


def test_class_folders_become_labelled_rgb_images_of_one_size(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=10)
    (root / "circle" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (root / ".DS_Store").write_bytes(b"\0\1")                   # ignored: hidden
    data = load_image_folder(root, image_size=32, channels=3, seed=0)
    assert data.class_names == ("circle", "square")
    assert data.train_images.shape == (18, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (2, 3, 32, 32)
    assert data.train_labels.bincount().tolist() == [9, 9] and data.test_labels.bincount().tolist() == [1, 1]
    # the discs are red, the squares blue: the labels follow the folders
    red_minus_blue = data.train_images[:, 0].float().mean((1, 2)) - data.train_images[:, 2].float().mean((1, 2))
    assert ((red_minus_blue > 0) == (data.train_labels == 0)).all()


def test_grayscale_64px_and_the_split_depend_only_on_seed(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=10)
    a, b = (load_image_folder(root, 64, channels=1, seed=3) for _ in range(2))
    assert a.train_images.shape == (18, 1, 64, 64)
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != load_image_folder(root, 64, channels=1, seed=4).content_hash()


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    data = load_image_folder(make_image_folder(tmp_path / "photos", per_class=10, classes=()), 32)
    assert data.class_names == () and len(data.train_images) == 9 and len(data.test_images) == 1


def test_train_and_test_subfolders_are_used_as_the_splits(tmp_path):
    make_image_folder(tmp_path / "ds" / "train", per_class=5)
    make_image_folder(tmp_path / "ds" / "test", per_class=2)
    data = load_image_folder(tmp_path / "ds", 32)
    assert len(data.train_images) == 10 and len(data.test_images) == 4
    assert data.class_names == ("circle", "square")


@pytest.mark.parametrize("damage, message", [
    ("corrupt", "cannot read image {root}/square/square_001.png"),
    ("truncated", "cannot read image {root}/square/square_001.png"),
    ("empty", "no images in {root}"),
    ("missing", "image folder {root} does not exist"),
    ("stray", "{root}: holds class subfolders and also images outside them (stray.png"),
    ("empty class", "class folder {root}/zebra holds no images"),
    ("looping link", "cannot read image {root}/square/x.png: Too many levels of symbolic links"),
    ("dangling link", "cannot read image {root}/square/x.png: No such file or directory"),
    ("fifo", "cannot read image {root}/square/x.png: not a regular file"),
    ("looping link, unlabelled", "cannot read image {root}/x.png: Too many levels of symbolic links"),
    ("looping link beside classes", "cannot read image {root}/x.png: Too many levels of symbolic links"),
])
def test_bad_folders_are_reported_by_name(tmp_path, damage, message):
    root = tmp_path / "shapes"
    if damage == "empty":
        root.mkdir()
    elif damage == "looping link, unlabelled":
        make_image_folder(root, per_class=3, classes=())
    elif damage != "missing":
        make_image_folder(root, per_class=3)
    bad = root / "square" / "square_001.png"
    if damage == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "stray":
        Image.new("RGB", (8, 8)).save(root / "stray.png")
    elif damage == "empty class":
        (root / "zebra").mkdir()
    elif damage == "looping link":
        os.symlink("x.png", root / "square" / "x.png")
    elif damage == "dangling link":
        os.symlink("gone.png", root / "square" / "x.png")
    elif damage == "fifo":
        os.mkfifo(root / "square" / "x.png")
    elif damage.startswith("looping link"):
        os.symlink("x.png", root / "x.png")
    with pytest.raises(DataError) as e:
        load_image_folder(root, 32)
    assert message.format(root=root) in str(e.value) and "\n" not in str(e.value)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# over PIL's MAX_IMAGE_PIXELS it warns and decodes anyway; over twice that it raises its own exception
@pytest.mark.parametrize("side", [math.isqrt(Image.MAX_IMAGE_PIXELS) + 1, 100_000])
def test_decompression_bomb_is_refused_by_name_without_a_warning(tmp_path, side):
    root = make_image_folder(tmp_path / "shapes", per_class=3)
    bomb = root / "square" / "square_001.png"
    bomb.write_bytes(png_header(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as e:
            load_image_folder(root, 32)
    message = str(e.value)
    assert message.startswith(f"cannot read image {bomb}: Image size ({side * side} pixels) exceeds limit")
    assert "decompression bomb" in message and "\n" not in message
    assert [str(w.message) for w in caught] == []


def _labelled(n_classes=4, per_class=3) -> ImageData:
    """Images whose pixels all equal their label, so relabelling can be checked image by image."""
    labels = torch.arange(n_classes).repeat(per_class)
    images = labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()
    return ImageData(images, labels, images[:n_classes], labels[:n_classes],
                     class_names=("cat", "dog", "ship", "airplane")[:n_classes])


@pytest.mark.parametrize("classes", [["ship", "airplane"], [2, 3], ["ship", 3]])
def test_class_subset_is_relabelled_in_the_order_given(classes):
    data = select_classes(_labelled(), classes)
    assert data.class_names == ("ship", "airplane")
    assert len(data.train_images) == 6 and len(data.test_images) == 2
    for images, labels in [(data.train_images, data.train_labels), (data.test_images, data.test_labels)]:
        original = images[:, 0, 0, 0].long()
        assert (labels == torch.where(original == 2, 0, 1)).all() and set(original.tolist()) == {2, 3}


@pytest.mark.parametrize("classes, message", [(["shipp"], "'shipp' is not a class"), ([7], "7 is not a class"),
                                              (["ship", 2], "names a class twice")])
def test_bad_class_subset_names_the_class(classes, message):
    with pytest.raises(DataError, match=message):
        select_classes(_labelled(), classes)


def test_convert_changes_channels_and_size():
    gray = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    rgb = convert(gray, image_size=32, channels=3)
    assert rgb.shape == (2, 3, 32, 32) and (rgb == 200).all()
    colour = torch.zeros(1, 3, 20, 30, dtype=torch.uint8)
    colour[:, 1] = 255  # pure green: luma 0.587 * 255
    back = convert(colour, image_size=16, channels=1)
    assert back.shape == (1, 1, 16, 16) and (back == 150).all()
    assert torch.equal(convert(gray), gray)  # nothing asked, nothing changed


def _prepare(tmp_path, data: dict) -> subprocess.CompletedProcess:
    """`python -m stages.prepare` in a folder whose params.yaml has the given data section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDPM_TRACKING": "off"}
    return subprocess.run([sys.executable, "-m", "stages.prepare", "data/prepared"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_prepare_stage_takes_a_class_subset_at_another_size(tmp_path):
    proc = _prepare(tmp_path, {"name": "glyphs", "classes": [7, "3"], "image_size": 32, "channels": 3})
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "data/prepared/info.json").read_text())
    assert info["class_names"] == ["7", "3"] and info["shape"] == [3, 32, 32]
    assert info["train_histogram"] == [600, 600] and info["test_histogram"] == [100, 100]


def test_prepare_stage_names_a_corrupt_image_and_writes_nothing(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=3)
    (root / "circle" / "circle_002.png").write_bytes(b"garbage")
    proc = _prepare(tmp_path, {"name": "imagefolder", "root": str(root)})
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: cannot read image {root}/circle/circle_002.png: " \
                                  f"cannot identify image file '{root}/circle/circle_002.png'"
    assert not (tmp_path / "data/prepared").exists()


@pytest.mark.parametrize("data, line", [
    ({"name": "glyphs", "classes": ["7", "77"]}, "error: data.classes: '77' is not a class of this dataset"),
    ({"name": "imagefolder", "root": "nowhere"}, "error: data.root: image folder nowhere does not exist")])
def test_prepare_stage_names_the_params_key_of_a_bad_data_argument(tmp_path, data, line):
    """The library speaks of its own arguments (`classes`, `root`); the stage names the key in params.yaml."""
    proc = _prepare(tmp_path, data)
    assert proc.returncode == 1 and proc.stderr.startswith(line) and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data/prepared").exists()
