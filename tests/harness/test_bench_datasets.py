"""Dataset loaders on small fixtures written here: class-disjoint halves, validation, errors."""

import gzip
import json
import struct

import numpy as np
import torch
import pytest
from PIL import Image

from benchmarks.data import loaders, registry, splits, transforms


def classes_of(split):
    return set(np.unique(split.labels).tolist())


def check_protocol(data, all_classes):
    """Train and val come from the first half of the classes, test from the second half."""
    ordered = sorted(all_classes)
    first_half = set(ordered[: len(ordered) // 2])
    assert classes_of(data.train) | classes_of(data.val) <= first_half
    assert classes_of(data.test) == set(ordered) - first_half
    assert len(data.train) and len(data.val) and len(data.test)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_is_class_disjoint_and_deterministic():
    data = loaders.load_digits_dataset()
    check_protocol(data, range(10))
    # Fewer than ten training classes: every fifth image of each training class validates.
    assert classes_of(data.val) == classes_of(data.train) == {0, 1, 2, 3, 4}
    again = loaders.load_digits_dataset()
    assert np.array_equal(again.test.labels, data.test.labels)
    assert (again.train.images == data.train.images).all()


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(10), 6)
    test_labels = np.repeat(np.arange(10), 2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, size=(60, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, size=(20, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_labels)
    data = registry.load_dataset("fashion-mnist", root=tmp_path)
    check_protocol(data, range(10))
    assert len(data.train) + len(data.val) == 40 and len(data.test) == 40
    image, label = data.test[0]
    assert tuple(image.shape) == (1, 28, 28) and label == 5
    assert -1.0 <= image.min() and image.max() <= 1.0
    limited = registry.load_dataset("fashion-mnist", root=tmp_path, limit=5)
    assert len(limited.test) == 25 and len(limited.train) + len(limited.val) == 25


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(splits.DatasetNotInstalled, match="apt-get install dataset-fashion-mnist"):
        registry.load_dataset("fashion-mnist", root=tmp_path)


def make_emoji_packages(root, num_classes, version="16.0.0"):
    entries = []
    for i in range(num_classes):
        entries.append({"image": f"{i:04x}.png", "unified": f"{i:04X}", "short_name": f"e{i}",
                        "sort_order": num_classes - i, "has_img_google": True, "has_img_twitter": True})
    entries.append({"image": "ffff.png", "unified": "FFFF", "short_name": "google_only",
                    "sort_order": 0, "has_img_google": True, "has_img_twitter": False})
    for package, style in (("emoji-datasource-google", "google"), ("emoji-datasource-twitter", "twitter")):
        folder = root / package
        (folder / "img" / style / "64").mkdir(parents=True)
        (folder / "package.json").write_text(json.dumps({"name": package, "version": version}))
        (folder / "emoji.json").write_text(json.dumps(entries))
        for i in range(num_classes):
            colour = (i * 20 % 256, 255 if style == "google" else 0, 0, 200)
            Image.new("RGBA", (64, 64), colour).save(folder / "img" / style / "64" / f"{i:04x}.png")


def test_emoji_pairs_google_and_twitter_images(tmp_path, monkeypatch):
    make_emoji_packages(tmp_path / "node_modules", 24)
    monkeypatch.chdir(tmp_path)
    data = registry.load_dataset("emoji", image_size=32)  # found under ./node_modules
    check_protocol(data, range(24))
    for split in (data.train, data.val, data.test):
        assert all(count == 2 for count in np.bincount(split.labels)[np.unique(split.labels)])
    # Classes follow the emoji sort order: label 0 is the emoji with the smallest sort_order.
    classes = loaders.emoji_classes(tmp_path / "node_modules")
    assert classes[0] == ("0017.png", "e23") and len(classes) == 24
    assert classes_of(data.val) == {9, 10, 11}  # the last fifth of the 12 training classes
    image, _ = data.test[0]
    assert tuple(image.shape) == (3, 32, 32)


def test_emoji_training_images_are_augmented_validation_and_test_are_not(tmp_path):
    make_emoji_packages(tmp_path / "node_modules", 24)
    data = registry.load_dataset("emoji", root=tmp_path / "node_modules", image_size=32)
    assert isinstance(data.train, transforms.RandomAffineImages) and data.train.padding == "border"
    assert not isinstance(data.val, transforms.RandomAffineImages) and not isinstance(data.test, transforms.RandomAffineImages)
    assert type(data.train.unaugmented()) is splits.TensorImageDataset


@pytest.mark.parametrize("padding, exposed", [("border", 1.0), ("background", -1.0)])
def test_random_affine_fills_what_comes_into_view(padding, exposed):
    images = torch.ones(16, 3, 32, 32)  # a white canvas (1) with a dark square (0) in the middle
    images[:, :, 12:20, 12:20] = 0.0
    augmented = transforms.RandomAffineImages(images, np.arange(16), degrees=30, shear=10, scale=0.2, translate=0.1,
                                            padding=padding)
    torch.manual_seed(0)
    batch = augmented.__getitems__(list(range(16)))
    warped = torch.stack([image for image, _ in batch])
    assert [label for _, label in batch] == list(range(16))
    assert not any(torch.allclose(w, images[0], atol=1e-3) for w in warped)  # each image moved
    corners = warped[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners - exposed).abs().max() < 1e-4 if padding == "border" else (corners < 0.5).any()
    with pytest.raises(ValueError, match="padding must be 'background' or 'border'"):
        transforms.RandomAffineImages(images, np.arange(16), padding="zeros")


def test_emoji_errors_name_the_npm_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(splits.DatasetNotInstalled, match="npm install emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0"):
        registry.load_dataset("emoji", root=tmp_path)
    make_emoji_packages(tmp_path / "node_modules", 6, version="15.1.2")
    with pytest.raises(splits.DatasetNotInstalled, match="version 15.1.2"):
        registry.load_dataset("emoji", root=tmp_path / "node_modules")


def make_image_folder(root, num_classes, per_class):
    for c in range(num_classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 16), (c * 10, i * 30, 0)).save(root / f"class{c:02d}" / f"{i}.png")
    (root / "notes.txt").write_text("not a class")


def test_folder_dataset(tmp_path):
    make_image_folder(tmp_path, num_classes=24, per_class=3)
    data = registry.load_dataset("folder", root=tmp_path, image_size=24)
    check_protocol(data, range(24))
    assert classes_of(data.val) == {9, 10, 11}
    image, label = data.train[0]
    assert tuple(image.shape) == (3, 24, 24) and label == 0


def test_folder_with_too_few_classes(tmp_path):
    make_image_folder(tmp_path, num_classes=3, per_class=2)
    with pytest.raises(ValueError, match="has 3 sub-folders with images"):
        registry.load_dataset("folder", root=tmp_path)


def test_cub200_through_pml_datasets(tmp_path):
    base = tmp_path / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    lines_images, lines_labels = [], []
    index = 1
    for class_id in (1, 2, 150, 151):
        for i in range(5):
            name = f"{class_id:03d}/{i}.jpg"
            (base / "images" / f"{class_id:03d}").mkdir(exist_ok=True)
            Image.new("RGB", (30, 30), (class_id, i, 0)).save(base / "images" / name)
            lines_images.append(f"{index} {name}")
            lines_labels.append(f"{index} {class_id}")
            index += 1
    (base / "images.txt").write_text("\n".join(lines_images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines_labels) + "\n")
    data = registry.load_dataset("cub200", root=tmp_path, image_size=16)
    assert classes_of(data.train) | classes_of(data.val) == {1, 2}
    assert classes_of(data.test) == {150, 151}
    assert tuple(data.test[0][0].shape) == (3, 16, 16)


def test_pml_dataset_not_installed(tmp_path):
    with pytest.raises(splits.DatasetNotInstalled, match="--download"):
        registry.load_dataset("sop", root=tmp_path / "missing")
    with pytest.raises(splits.DatasetNotInstalled, match="cannot read the dataset"):
        registry.load_dataset("cars196", root=tmp_path)


def test_validation_split_modes():
    labels = np.repeat(np.arange(10), 5)
    train, val = splits.validation_split(labels, "classes")
    assert set(labels[val]) == {8, 9} and set(labels[train]) == set(range(8))
    train, val = splits.validation_split(labels, "samples")
    assert len(val) == 10 and set(labels[val]) == set(range(10))
    with pytest.raises(ValueError, match="leaves no validation images"):
        splits.validation_split(np.repeat(np.arange(3), 2), "samples")
    with pytest.raises(ValueError, match="at least 4 classes"):
        splits.class_disjoint_halves(np.array([0, 1, 2]))
