"""The class-disjoint protocol of deep metric learning, and the splits it makes.

The classes, in a fixed order, are cut in two: the first half trains, the second half
tests. A validation split, used to pick the best epoch and to stop early, is carved out
of the training classes: the last fifth of the training classes when there are at least
ten of them ("classes"), otherwise every fifth image of each training class ("samples").
"""

import dataclasses
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

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

class LabeledSubset(Subset):
    """torch's ``Subset`` that also carries its labels, which samplers and the split report read."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, all_labels: np.ndarray):
        super().__init__(dataset, indices.tolist())
        self.labels = np.asarray(all_labels, dtype=np.int64)[indices]


@dataclasses.dataclass
class BenchmarkData:
    """Train, validation and test splits of one dataset (its channels are a registry fact)."""

    train: Dataset
    val: Dataset
    test: Dataset

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


def assemble(full: TensorImageDataset, val_mode, limit) -> BenchmarkData:
    """Splits of an in-memory dataset (copies of the tensors, so each split is contiguous)."""
    train, val, test = protocol_indices(full.labels, val_mode, limit)
    return BenchmarkData(full.subset(train), full.subset(val), full.subset(test))


def assemble_files(train_view, eval_view, labels, val_mode, limit, test_view=None) -> BenchmarkData:
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
    )


def split_sizes(data: BenchmarkData) -> List[str]:
    """Human-readable sizes of the three splits."""
    return [
        f"{split}: {len(d)} images, {len(np.unique(d.labels))} classes"
        for split, d in (("train", data.train), ("val", data.val), ("test", data.test))
    ]
