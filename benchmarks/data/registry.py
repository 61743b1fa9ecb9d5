"""The dataset registry: every fact the harness knows about a dataset, in one entry.

Adding a dataset means writing one loader, ``load_x(root=None, val_mode="auto", limit=None)
-> BenchmarkData`` (it may also take ``image_size`` and ``download``), and adding one
``DatasetEntry`` to ``DATASETS`` below. ``--help``, the settings' per-dataset defaults and
the dataset table of ``docs/datasets.md`` (checked by a test) all come from here.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Optional

from . import emoji_styles, glyphs, loaders
from .splits import BenchmarkData


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One dataset: its loader, what the model needs, training defaults and where to get it."""

    loader: Callable[..., BenchmarkData]
    channels: int
    default_model: str
    image_size: Optional[int]  # side of RGB images; None for sets whose images have one fixed size
    training: Dict[str, Any]  # defaults of the per-dataset settings (``_training``)
    size: str
    split: str  # classes and images of the train, validation and test splits
    install: str
    licence: str
    command: str

    def load(self, root=None, download=False, image_size=None, val_mode="auto", limit=None) -> BenchmarkData:
        """Call the loader with the options it takes."""
        offered = dict(root=root, download=download, image_size=image_size or self.image_size,
                       val_mode=val_mode, limit=limit)
        accepted = inspect.signature(self.loader).parameters
        return self.loader(**{k: v for k, v in offered.items() if k in accepted})


def _training(epochs, batch_size, m_per_class, embedding_size, lr, freeze_trunk=False, passes_per_epoch=1,
              patience=5, lr_decay=None, lr_patience=0):
    return dict(epochs=epochs, batch_size=batch_size, m_per_class=m_per_class, embedding_size=embedding_size,
                lr=lr, freeze_trunk=freeze_trunk, passes_per_epoch=passes_per_epoch, patience=patience,
                lr_decay=lr_decay, lr_patience=lr_patience)


# Every dataset but digits (the tests' quick check) trains to a plateau of validation MAP@R: the
# learning rate times 0.1 after 2 evaluations without improvement, a stop after 4; the epoch
# count is a cap.
TO_PLATEAU = dict(patience=3, lr_decay=0.1, lr_patience=1)

_PML_INSTALL = "PML's `datasets` module: `--data-root DIR`, add `--download` to fetch"
_RESEARCH_ONLY = "non-commercial research use (see the dataset's site)"

DATASETS: Dict[str, DatasetEntry] = {
    "digits": DatasetEntry(
        loader=loaders.load_digits_dataset, channels=1, default_model="cnn", image_size=None,
        training=_training(15, 64, 16, 64, 1e-3),
        size="1,797 8x8 images, 10 classes",
        split="5 training classes (723 images; 178 more validate: every fifth image), 5 test classes (896 images)",
        install="bundled with scikit-learn", licence="CC BY 4.0 (UCI)",
        command="python -m benchmarks.run --dataset digits",
    ),
    "glyphs": DatasetEntry(
        loader=glyphs.load_glyphs, channels=1, default_model="cnn4", image_size=None,
        training=_training(60, 128, 4, 64, 3e-3, **TO_PLATEAU),
        size="35,645 32x32 images, 2,958 classes (one character in 8 to 16 fonts)",
        split="1,184 training classes (14,253 images), 295 validation classes (3,566), 493 test classes (5,923: every third test class)",
        install="nothing: rendered once from the fonts matplotlib ships, cached under `--data-root` "
        "(default `~/.cache/pml-ice/glyphs`)",
        licence="DejaVu fonts: Bitstream Vera licence; STIX fonts: SIL OFL 1.1",
        command="python -m benchmarks.run",
    ),
    "fashion-mnist": DatasetEntry(
        loader=loaders.load_fashion_mnist, channels=1, default_model="cnn", image_size=None,
        training=_training(60, 128, 32, 64, 1e-3, **TO_PLATEAU),
        size="70,000 28x28 images, 10 classes",
        split="5 training classes (28,000 images; 7,000 more validate: every fifth image), 5 test classes (35,000); with `--limit-per-class 300`: 1,200 / 300 / 1,500 images",
        install="`sudo apt-get install dataset-fashion-mnist` (or `--data-root` with the four `*-ubyte.gz` files)",
        licence="MIT", command="python -m benchmarks.run --dataset fashion-mnist --limit-per-class 300",
    ),
    "emoji": DatasetEntry(
        loader=loaders.load_emoji, channels=3, default_model="cnn4", image_size=32,
        training=_training(60, 128, 2, 64, 3e-3, passes_per_epoch=8, **TO_PLATEAU),
        size="3,822 images, 1,911 classes (Google and Twitter drawings)",
        split="764 training classes (1,528 images), 191 validation classes (382), 956 test classes (1,912)",
        install=f"`{loaders.EMOJI_INSTALL}` (found under `./node_modules`, its parents or `~`, or `--data-root`)",
        licence="Apache 2.0 (Noto), CC BY 4.0 (Twemoji)", command="python -m benchmarks.run --dataset emoji",
    ),
    "emoji-styles": DatasetEntry(
        loader=emoji_styles.load_emoji_styles, channels=3, default_model="cnn4", image_size=32,
        training=_training(100, 128, 4, 64, 3e-3, **TO_PLATEAU),
        size="16,499 images, 1,759 classes (each drawn by 4 to 12 of 12 emoji styles, median 10)",
        split="703 training classes (6,616 images), 176 validation classes (1,628), 880 test classes (8,255)",
        install=f"`{emoji_styles.INSTALL}` (found as for `emoji`), then rendered once with resvg-py and cached under "
        "`~/.cache/pml-ice/emoji-styles`",
        licence="MIT (Fluent), Apache 2.0 (Noto, Firefox OS), CC BY 4.0 (Twemoji, EmojiOne), "
        "CC BY-SA 4.0 (OpenMoji, EmojiOne v1)",
        command="python -m benchmarks.run --dataset emoji-styles",
    ),
    "cub200": DatasetEntry(
        loader=functools.partial(loaders.load_pml_dataset, "cub200"), channels=3, default_model="resnet50",
        image_size=224, training=_training(100, 128, 4, 128, 1e-5, **TO_PLATEAU),
        size="11,788 images, 200 classes", split="100 training classes (5,864 images, a fifth of the classes validate), 100 test classes (5,924)",
        install=_PML_INSTALL, licence=_RESEARCH_ONLY,
        command="python -m benchmarks.run --dataset cub200 --data-root data/cub --download",
    ),
    "cars196": DatasetEntry(
        loader=functools.partial(loaders.load_pml_dataset, "cars196"), channels=3, default_model="resnet50",
        image_size=224, training=_training(100, 128, 4, 128, 1e-5, **TO_PLATEAU),
        size="16,185 images, 196 classes", split="98 training classes (8,054 images, a fifth of the classes validate), 98 test classes (8,131)",
        install=_PML_INSTALL, licence=_RESEARCH_ONLY,
        command="python -m benchmarks.run --dataset cars196 --data-root data/cars --download",
    ),
    "sop": DatasetEntry(
        loader=functools.partial(loaders.load_pml_dataset, "sop"), channels=3, default_model="resnet50",
        image_size=224, training=_training(100, 128, 4, 128, 1e-5, **TO_PLATEAU),
        size="120,053 images, 22,634 classes", split="11,318 training classes (59,551 images, a fifth of the classes validate), 11,316 test classes (60,502)",
        install=_PML_INSTALL, licence=_RESEARCH_ONLY,
        command="python -m benchmarks.run --dataset sop --data-root data/sop --download",
    ),
    "folder": DatasetEntry(
        loader=loaders.load_folder, channels=3, default_model="efficientnet-lite0", image_size=224,
        training=_training(60, 64, 4, 128, 1e-4, **TO_PLATEAU),
        size="yours", split="the first half of the classes trains (a fifth of them validate; every fifth image under 10 classes), the second half tests",
        install="any folder with one sub-folder of images per class", licence="yours",
        command="python -m benchmarks.run --dataset folder --data-root my_images",
    ),
}


def load_dataset(name: str, root=None, download=False, image_size=None, val_mode="auto", limit=None) -> BenchmarkData:
    """Load a registered dataset by name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name].load(root, download, image_size, val_mode, limit)


def readme_table() -> str:
    """The dataset table of ``docs/datasets.md``."""
    lines = ["| dataset | size | split (class-disjoint) | how to get it | licence | command |", "|---|---|---|---|---|---|"]
    for name, entry in DATASETS.items():
        lines.append(f"| `{name}` | {entry.size} | {entry.split} | {entry.install} | {entry.licence} | `{entry.command}` |")
    return "\n".join(lines)


def help_text() -> str:
    """Per-dataset lines for ``--help``: defaults, model and where to get the data."""
    lines = []
    for name, entry in DATASETS.items():
        defaults = dict(entry.training, model=entry.default_model, image_size=entry.image_size)
        values = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in defaults.items() if v is not None)
        lines.append(f"  {name} ({entry.size}; {entry.install.replace('`', '')}):\n      {values}")
    return "\n".join(lines)
