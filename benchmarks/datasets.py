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
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

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
# rotation and shear in degrees, scale +-, shift as a fraction of the side; no flip (arrows point somewhere)
EMOJI_AUGMENTATION = dict(degrees=15.0, shear=10.0, scale=0.15, translate=0.1, padding="border")
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


class RandomAffineImages(TensorImageDataset):
    """Training images held in memory, each batch drawn with its own small random affine map.

    Rotation up to ``degrees``, shear up to ``shear`` degrees, scale within ``1 +- scale``
    and shift up to ``translate`` of the side, sampled per image from torch's generator
    (seeded by the harness) and applied to the whole batch at once with ``affine_grid`` /
    ``grid_sample`` (torchvision's per-image RandomAffine costs as much as a training step
    here). What comes into view is filled with -1 (the glyphs' normalised background), or
    with ``padding="border"`` by the nearest edge pixel (images on a background of any colour).
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, degrees=8.0, shear=8.0, scale=0.1, translate=0.06,
                 padding="background"):
        super().__init__(images, labels)
        if padding not in ("background", "border"):
            raise ValueError(f"padding must be 'background' or 'border', got {padding!r}")
        self.degrees, self.shear, self.scale, self.translate, self.padding = degrees, shear, scale, translate, padding

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        """The batch of ``indices`` (DataLoader calls this once per batch), augmented."""
        images = self.images[indices]
        n = len(indices)

        def uniform(bound):
            return (torch.rand(n) * 2 - 1) * bound

        angle, shear = torch.deg2rad(uniform(self.degrees)), torch.deg2rad(uniform(self.shear))
        scale = 1 + uniform(self.scale)
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        theta = torch.stack([
            torch.stack([cos * scale, (cos * tan - sin) * scale, 2 * uniform(self.translate)], dim=1),
            torch.stack([sin * scale, (sin * tan + cos) * scale, 2 * uniform(self.translate)], dim=1),
        ], dim=1)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        if self.padding == "border":
            warped = torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)
        else:
            warped = torch.nn.functional.grid_sample(images + 1, grid, align_corners=False) - 1
        return [(image, int(label)) for image, label in zip(warped, self.labels[indices])]

    def subset(self, indices):
        return RandomAffineImages(self.images[indices], self.labels[indices], self.degrees, self.shear,
                                  self.scale, self.translate, self.padding)

    def unaugmented(self) -> TensorImageDataset:
        return TensorImageDataset(self.images, self.labels)


class LabeledSubset(Subset):
    """torch's ``Subset`` that also carries its labels, which samplers and the split report read."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, all_labels: np.ndarray):
        super().__init__(dataset, indices.tolist())
        self.labels = np.asarray(all_labels, dtype=np.int64)[indices]


@dataclasses.dataclass
class BenchmarkData:
    """Train, validation and test splits of one dataset, with what the model needs."""

    train: Dataset
    val: Dataset
    test: Dataset
    in_channels: int

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


def protocol_indices(labels: np.ndarray, val_mode: str, limit: Optional[int]):
    """(train, val, test) indices of one pool of images: limit, class-disjoint halves, validation."""
    kept = limit_per_class(labels, limit)
    first_half, second_half = class_disjoint_halves(labels[kept])
    train, val = validation_split(labels[kept][first_half], val_mode)
    return kept[first_half][train], kept[first_half][val], kept[second_half]


def _assemble(full: TensorImageDataset, in_channels, val_mode, limit) -> BenchmarkData:
    """Splits of an in-memory dataset (copies of the tensors, so each split is contiguous)."""
    train, val, test = protocol_indices(full.labels, val_mode, limit)
    return BenchmarkData(full.subset(train), full.subset(val), full.subset(test), in_channels)


def _assemble_files(train_view, eval_view, labels, in_channels, val_mode, limit,
                    test_view=None) -> BenchmarkData:
    """Splits of an image-file dataset whose images have ``labels``: the train split reads
    ``train_view`` (augmenting transform), val and test read ``eval_view``, or ``test_view``
    when the test images are a dataset of their own (already class-disjoint)."""
    labels = np.asarray(labels, dtype=np.int64)
    if test_view is None:
        train, val, test = protocol_indices(labels, val_mode, limit)
        test_view, test_labels = eval_view, labels
    else:
        kept = limit_per_class(labels, limit)
        fit, held_out = validation_split(labels[kept], val_mode)
        train, val = kept[fit], kept[held_out]
        test_labels = np.asarray(test_view.labels, dtype=np.int64)
        test = limit_per_class(test_labels, limit)
    return BenchmarkData(
        train=LabeledSubset(train_view, train, labels),
        val=LabeledSubset(eval_view, val, labels),
        test=LabeledSubset(test_view, test, test_labels),
        in_channels=in_channels,
    )


def load_digits_dataset(val_mode="auto", limit=None) -> BenchmarkData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - 0.5) / 0.5
    full = TensorImageDataset(images, digits.target)
    return _assemble(full, 1, val_mode, limit)


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
    return _assemble(full, 1, val_mode, limit)


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


def load_emoji(root=None, image_size=32, val_mode="auto", limit=None) -> BenchmarkData:
    """Emoji: one Google and one Twitter image per emoji, 1,911 classes in version 16.0.0,
    drawn on white at ``image_size`` pixels; training images get a random affine map
    (``EMOJI_AUGMENTATION``, edges extended), validation and test images none."""
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
    data = _assemble(full, 3, val_mode, limit)
    data.train = RandomAffineImages(data.train.images, data.train.labels, **EMOJI_AUGMENTATION)
    return data


def _to_rgb(image):
    return image.convert("RGB")


def image_transforms(image_size: int, train: bool):
    """Standard DML transforms: random resized crop and flip to train, resize+centre crop to test."""
    from torchvision import transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return transforms.Compose([
            transforms.Lambda(_to_rgb),
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ])
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize(int(round(image_size * 256 / 224))),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])


def load_folder(root, image_size=224, val_mode="auto", limit=None) -> BenchmarkData:
    """Any folder with one sub-folder of images per class (torchvision's ``ImageFolder``)."""
    from torchvision.datasets import ImageFolder

    if root is None:
        raise DatasetNotInstalled("folder: pass --data-root DIR, a folder with one sub-folder of images per class.")
    if not Path(root).is_dir():
        raise DatasetNotInstalled(f"folder: {root} is not a directory; pass --data-root DIR with one sub-folder per class.")
    views = []
    for train in (True, False):
        try:
            views.append(ImageFolder(str(root), transform=image_transforms(image_size, train), allow_empty=True))
        except FileNotFoundError:  # no sub-folder at all
            views.append(None)
    with_images = len(set(views[0].targets)) if views[0] is not None else 0
    if with_images < 4:
        raise ValueError(
            f"folder: {root} has {with_images} sub-folders with images; the class-disjoint protocol needs at least 4"
        )
    return _assemble_files(views[0], views[1], views[0].targets, 3, val_mode, limit)


_PML_DATASETS = {
    "cub200": ("CUB", "CUB_200_2011 (images.txt, image_class_labels.txt, images/)", "1.1 GB"),
    "cars196": ("Cars196", "names.csv, anno_train.csv, anno_test.csv, car_data/", "1.9 GB"),
    "sop": ("StanfordOnlineProducts", "Stanford_Online_Products/ (Ebay_train.txt, Ebay_test.txt)", "2.9 GB"),
}


def load_pml_dataset(name, root, download=False, image_size=224, val_mode="auto", limit=None) -> BenchmarkData:
    """CUB-200-2011, Cars196 or Stanford Online Products from PML's ``datasets`` module, whose
    train and test splits are already class-disjoint."""
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
    try:
        train_view, eval_view, test_view = (
            dataset_class(root=str(root), split=split, download=download, transform=image_transforms(image_size, train))
            for split, train in (("train", True), ("train", False), ("test", False))
        )
    except (OSError, ValueError) as error:
        raise DatasetNotInstalled(
            f"{name}: cannot read the dataset under {root} ({error}). It must hold {layout}; "
            f"--download lets PML fetch it (about {size}, needs internet)."
        ) from error
    return _assemble_files(train_view, eval_view, train_view.labels, 3, val_mode, limit,
                           test_view=test_view)


def split_sizes(data: BenchmarkData) -> List[str]:
    """Human-readable sizes of the three splits."""
    return [
        f"{split}: {len(d)} images, {len(np.unique(d.labels))} classes"
        for split, d in (("train", data.train), ("val", data.val), ("test", data.test))
    ]
