"""One loader per dataset: read the images, cut them with the class-disjoint protocol."""

import gzip
import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .splits import BenchmarkData, DatasetNotInstalled, TensorImageDataset, assemble, assemble_files
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RandomAffineImages, image_transforms

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

def load_digits_dataset(val_mode="auto", limit=None) -> BenchmarkData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - 0.5) / 0.5
    full = TensorImageDataset(images, digits.target)
    return assemble(full, val_mode, limit)


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
    return assemble(full, val_mode, limit)


EMOJI_PACKAGE_FOLDER = Path(__file__).resolve().parent  # package.json: `npm ci --prefix benchmarks/data`


def find_node_modules(packages=EMOJI_PACKAGES) -> Optional[Path]:
    """The first ``node_modules`` holding all ``packages`` (by default both emoji packages): cwd
    and parents, beside this loader's ``package.json``, then home and the system's."""
    start = Path.cwd().resolve()
    candidates = [p / "node_modules" for p in [start, *start.parents]] + [EMOJI_PACKAGE_FOLDER / "node_modules"]
    candidates += [Path.home() / "node_modules", Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules")]
    for candidate in candidates:
        if all((candidate / package).is_dir() for package in packages):
            return candidate
    return None


def _emoji_root(root) -> Path:
    if root is None:
        found = find_node_modules()
        if found is None:
            raise DatasetNotInstalled(
                "emoji: no node_modules with emoji-datasource-google and "
                "emoji-datasource-twitter was found in the current folder, its parents, "
                f"{EMOJI_PACKAGE_FOLDER} or your home. Install them with `{EMOJI_INSTALL}` (in this "
                f"folder), or `npm ci --prefix {EMOJI_PACKAGE_FOLDER}`, or pass --data-root PATH/TO/node_modules."
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
    data = assemble(full, val_mode, limit)
    data.train = RandomAffineImages(data.train.images, data.train.labels, **EMOJI_AUGMENTATION)
    return data

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
    return assemble_files(views[0], views[1], views[0].targets, val_mode, limit)


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
    return assemble_files(train_view, eval_view, train_view.labels, val_mode, limit,
                           test_view=test_view)
