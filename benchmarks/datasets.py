"""Datasets with the class-disjoint protocol of deep metric learning.

The classes, in a fixed order, are cut in two: the first half trains, the second half
tests. A validation split, used to pick the best epoch and to stop early, is carved out
of the training classes: the last fifth of the training classes when there are at least
ten of them ("classes"), otherwise every fifth image of each training class ("samples").
"""

import dataclasses
import gzip
import json
import struct
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("digits", "glyphs", "fashion-mnist", "emoji", "cub200", "cars196", "sop", "folder")
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
EMOJI_PACKAGES = ("emoji-datasource-google", "emoji-datasource-twitter")
EMOJI_VERSION = "16.0.0"
EMOJI_INSTALL = (
    f"npm install emoji-datasource-google@{EMOJI_VERSION} emoji-datasource-twitter@{EMOJI_VERSION}"
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetNotInstalled(RuntimeError):
    """The data of a dataset cannot be found; the message says how to install it."""


class TensorImageDataset(Dataset):
    """Images held in memory as one float tensor (N, C, H, W), with integer labels."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])

    def subset(self, indices):
        return TensorImageDataset(self.images[indices], self.labels[indices])


class ImageFileDataset(Dataset):
    """Images read from files on access, converted to RGB and transformed."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform=None):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def subset(self, indices):
        return ImageFileDataset([self.paths[i] for i in indices], self.labels[indices], self.transform)


@dataclasses.dataclass
class BenchmarkData:
    """Train, validation and test splits of one dataset, with what the model needs."""

    train: Dataset
    val: Dataset
    test: Dataset
    in_channels: int
    default_model: str

    @property
    def num_train_classes(self) -> int:
        return len(np.unique(self.train.labels))


def class_disjoint_halves(labels: np.ndarray):
    """Indices of the first half of the classes (sorted by label) and of the second half."""
    order = sorted(np.unique(labels).tolist())
    if len(order) < 4:
        raise ValueError(f"the class-disjoint protocol needs at least 4 classes, got {len(order)}")
    train_classes = set(order[: len(order) // 2])
    in_train = np.array([label in train_classes for label in labels])
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def validation_split(labels: np.ndarray, mode: str):
    """Split training indices into (train, val) by classes or by samples; deterministic."""
    classes = sorted(np.unique(labels).tolist())
    if mode == "auto":
        mode = "classes" if len(classes) >= 10 else "samples"
    if mode == "classes":
        num_val = max(1, int(np.ceil(len(classes) / 5)))
        val_classes = set(classes[-num_val:])
        in_val = np.array([label in val_classes for label in labels])
    elif mode == "samples":
        in_val = np.zeros(len(labels), dtype=bool)
        for c in classes:
            members = np.flatnonzero(labels == c)
            in_val[members[4::5]] = True
    else:
        raise ValueError(f"unknown validation mode '{mode}'; valid: auto, classes, samples")
    if in_val.all() or not in_val.any():
        raise ValueError(
            f"validation mode '{mode}' leaves {'no training' if in_val.all() else 'no validation'} images "
            f"({len(labels)} training images in {len(classes)} classes); add images or change --val"
        )
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def limit_per_class(labels: np.ndarray, limit: Optional[int]) -> np.ndarray:
    """Indices keeping the first ``limit`` images of every class (all when None)."""
    if limit is None:
        return np.arange(len(labels))
    if limit < 1:
        raise ValueError(f"--limit-per-class must be at least 1, got {limit}")
    keep = []
    for c in np.unique(labels):
        keep.extend(np.flatnonzero(labels == c)[:limit].tolist())
    return np.array(sorted(keep), dtype=np.int64)


def _assemble(full, in_channels, default_model, val_mode, limit, train_full=None, test_full=None):
    """Apply limit, class-disjoint halves (unless given) and the validation split."""
    if full is not None:
        full = full.subset(limit_per_class(full.labels, limit))
        train_idx, test_idx = class_disjoint_halves(full.labels)
        train_full, test_full = full.subset(train_idx), full.subset(test_idx)
    else:
        train_full = train_full.subset(limit_per_class(train_full.labels, limit))
        test_full = test_full.subset(limit_per_class(test_full.labels, limit))
    train_idx, val_idx = validation_split(train_full.labels, val_mode)
    return BenchmarkData(
        train=train_full.subset(train_idx),
        val=train_full.subset(val_idx),
        test=test_full,
        in_channels=in_channels,
        default_model=default_model,
    )


def load_digits_dataset(val_mode="auto", limit=None) -> BenchmarkData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - 0.5) / 0.5
    full = TensorImageDataset(images, digits.target)
    return _assemble(full, 1, "cnn", val_mode, limit)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root=None, val_mode="auto", limit=None) -> BenchmarkData:
    """Fashion-MNIST (70,000 28x28 images, 10 classes) from its four IDX files."""
    root = Path(root or FASHION_MNIST_DEFAULT_ROOT)
    missing = [f for f in FASHION_MNIST_FILES if not (root / f).is_file()]
    if missing:
        raise DatasetNotInstalled(
            f"fashion-mnist: {', '.join(missing)} not found in {root}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (files go to "
            f"{FASHION_MNIST_DEFAULT_ROOT}) or pass --data-root DIR holding the four files "
            f"{', '.join(FASHION_MNIST_FILES)}."
        )
    images = np.concatenate([_read_idx(root / FASHION_MNIST_FILES[0]), _read_idx(root / FASHION_MNIST_FILES[2])])
    labels = np.concatenate([_read_idx(root / FASHION_MNIST_FILES[1]), _read_idx(root / FASHION_MNIST_FILES[3])])
    if len(images) != len(labels):
        raise ValueError(f"fashion-mnist in {root}: {len(images)} images but {len(labels)} labels")
    tensor = (torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0 - 0.5) / 0.5
    full = TensorImageDataset(tensor, labels.astype(np.int64))
    return _assemble(full, 1, "cnn", val_mode, limit)


def find_node_modules() -> Optional[Path]:
    """The first ``node_modules`` holding both emoji packages: cwd and parents, then home."""
    start = Path.cwd().resolve()
    candidates = [p / "node_modules" for p in [start, *start.parents]]
    candidates += [Path.home() / "node_modules", Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules")]
    for candidate in candidates:
        if all((candidate / package).is_dir() for package in EMOJI_PACKAGES):
            return candidate
    return None


def _emoji_root(root) -> Path:
    if root is None:
        found = find_node_modules()
        if found is None:
            raise DatasetNotInstalled(
                "emoji: no node_modules with emoji-datasource-google and "
                "emoji-datasource-twitter was found in the current folder, its parents or "
                f"your home. Install them with `{EMOJI_INSTALL}` (in this folder) or pass "
                "--data-root PATH/TO/node_modules."
            )
        return found
    root = Path(root)
    if root.name != "node_modules" and (root / "node_modules").is_dir():
        root = root / "node_modules"
    missing = [p for p in EMOJI_PACKAGES if not (root / p).is_dir()]
    if missing:
        raise DatasetNotInstalled(
            f"emoji: {', '.join(missing)} not found under {root}. Install with `{EMOJI_INSTALL}`."
        )
    return root


def emoji_classes(root: Path):
    """(image file name, class name) of every emoji drawn by both Google and Twitter."""
    with open(root / "emoji-datasource-google" / "emoji.json", encoding="utf-8") as f:
        entries = json.load(f)
    entries = [e for e in entries if e.get("has_img_google") and e.get("has_img_twitter")]
    entries.sort(key=lambda e: (e["sort_order"], e["unified"]))
    return [(e["image"], e["short_name"]) for e in entries]


def _load_rgba_on_white(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image)
        rgb = canvas.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def load_emoji(root=None, image_size=128, val_mode="auto", limit=None) -> BenchmarkData:
    """Emoji: one Google and one Twitter image per emoji, 1,911 classes in version 16.0.0."""
    root = _emoji_root(root)
    for package in EMOJI_PACKAGES:
        with open(root / package / "package.json", encoding="utf-8") as f:
            version = json.load(f).get("version")
        if version != EMOJI_VERSION:
            raise DatasetNotInstalled(
                f"emoji: {package} is version {version} under {root}, the benchmark is defined on "
                f"{EMOJI_VERSION}; install it with `{EMOJI_INSTALL}`."
            )
    classes = emoji_classes(root)
    images, labels = [], []
    for label, (file_name, _) in enumerate(classes):
        for package, style in (("emoji-datasource-google", "google"), ("emoji-datasource-twitter", "twitter")):
            path = root / package / "img" / style / "64" / file_name
            if not path.is_file():
                raise DatasetNotInstalled(f"emoji: image {path} is missing; reinstall with `{EMOJI_INSTALL}`.")
            images.append(_load_rgba_on_white(path, image_size))
            labels.append(label)
    tensor = torch.stack(images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    full = TensorImageDataset((tensor - mean) / std, np.array(labels))
    return _assemble(full, 3, "efficientnet-lite0", val_mode, limit)


def image_transforms(image_size: int, train: bool):
    """Standard DML transforms: random resized crop and flip to train, resize+centre crop to test."""
    from torchvision import transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return transforms.Compose([
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
    return transforms.Compose([
        transforms.Resize(int(round(image_size * 256 / 224))),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])


def _with_transforms(data: BenchmarkData, image_size: int) -> BenchmarkData:
    data.train.transform = image_transforms(image_size, train=True)
    data.val.transform = image_transforms(image_size, train=False)
    data.test.transform = image_transforms(image_size, train=False)
    return data


def load_folder(root, image_size=224, val_mode="auto", limit=None) -> BenchmarkData:
    """Any folder with one sub-folder of images per class (sub-folders sorted by name)."""
    if root is None:
        raise DatasetNotInstalled("folder: pass --data-root DIR, a folder with one sub-folder of images per class.")
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotInstalled(f"folder: {root} is not a directory; pass --data-root DIR with one sub-folder per class.")
    paths, labels = [], []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    non_empty = len(set(labels))
    if non_empty < 4:
        raise ValueError(
            f"folder: {root} has {non_empty} sub-folders with images ({', '.join(IMAGE_EXTENSIONS)}); "
            "the class-disjoint protocol needs at least 4"
        )
    full = ImageFileDataset(paths, np.array(labels))
    data = _assemble(full, 3, "efficientnet-lite0", val_mode, limit)
    return _with_transforms(data, image_size)


_PML_DATASETS = {
    "cub200": ("CUB", "CUB_200_2011 (images.txt, image_class_labels.txt, images/)", "1.1 GB"),
    "cars196": ("Cars196", "names.csv, anno_train.csv, anno_test.csv, car_data/", "1.9 GB"),
    "sop": ("StanfordOnlineProducts", "Stanford_Online_Products/ (Ebay_train.txt, Ebay_test.txt)", "2.9 GB"),
}


def load_pml_dataset(name, root, download=False, image_size=224, val_mode="auto", limit=None) -> BenchmarkData:
    """CUB-200-2011, Cars196 or Stanford Online Products through PML's ``datasets`` module."""
    from pytorch_metric_learning import datasets as pml_datasets

    class_name, layout, size = _PML_DATASETS[name]
    if root is None:
        raise DatasetNotInstalled(
            f"{name}: pass --data-root DIR, a folder holding {layout}; add --download to let "
            f"PML fetch it (about {size}, needs internet)."
        )
    if not download and not Path(root).is_dir():
        raise DatasetNotInstalled(
            f"{name}: {root} does not exist. Put {layout} there, or add --download to let PML "
            f"fetch it (about {size}, needs internet)."
        )
    dataset_class = getattr(pml_datasets, class_name)
    splits = []
    try:
        for split in ("train", "test"):
            d = dataset_class(root=str(root), split=split, download=download)
            splits.append(ImageFileDataset(d.paths, np.array(d.labels)))
    except (OSError, ValueError) as error:
        raise DatasetNotInstalled(
            f"{name}: cannot read the dataset under {root} ({error}). It must hold {layout}; "
            f"--download lets PML fetch it (about {size}, needs internet)."
        ) from error
    data = _assemble(None, 3, "resnet50", val_mode, limit, train_full=splits[0], test_full=splits[1])
    return _with_transforms(data, image_size)


def load_dataset(name: str, root=None, download=False, image_size=None, val_mode="auto",
                 limit=None) -> BenchmarkData:
    """Load a dataset by name (one of ``DATASETS``)."""
    if name == "digits":
        return load_digits_dataset(val_mode, limit)
    if name == "glyphs":
        from .glyphs import load_glyphs

        return load_glyphs(root, val_mode, limit)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, val_mode, limit)
    if name == "emoji":
        return load_emoji(root, image_size or 128, val_mode, limit)
    if name == "folder":
        return load_folder(root, image_size or 224, val_mode, limit)
    if name in _PML_DATASETS:
        return load_pml_dataset(name, root, download, image_size or 224, val_mode, limit)
    raise ValueError(f"unknown dataset '{name}'; valid datasets: {', '.join(DATASETS)}")


def split_sizes(data: BenchmarkData) -> List[str]:
    """Human-readable sizes of the three splits."""
    return [
        f"{split}: {len(d)} images, {len(np.unique(d.labels))} classes"
        for split, d in (("train", data.train), ("val", data.val), ("test", data.test))
    ]
