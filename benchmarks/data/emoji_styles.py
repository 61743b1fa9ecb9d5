"""Emoji styles: one class per emoji, one image per freely licensed drawing style that draws it.

The styles come from npm packages pinned in ``benchmarks/data/package.json``
(``npm ci --prefix benchmarks/data``): the Iconify JSON sets of Fluent (flat, colour, high
contrast), Noto (today's and v1), Twemoji, EmojiOne (colour, monotone, v1) and Firefox OS,
and OpenMoji's own package (colour and black line art). Each drawing is found by its
code-point sequence: Iconify's ``chars.json`` (sequence -> icon name), OpenMoji's file names,
or, for the Iconify sets without a ``chars.json``, the icon's name, which the sets with one
map to a sequence (CLDR names; Firefox OS names its icons by their Unicode character names).

A class is a code-point sequence without variation selectors (U+FE0E, U+FE0F), so one emoji
written with or without U+FE0F is one class; sequences with a skin-tone modifier or a
private-use code point are left out. Drawings are rendered with resvg, composited on white.
A drawing is used unless it is blank (less than ``MIN_INK`` of the canvas covered) or nearly
equal to the same style's drawing of another class (``DUPLICATE_THRESHOLD``: a monochrome
style draws the hearts of every colour alike), both judged at ``ANALYSIS_SIZE`` pixels so that
every image size has the same images; a class is kept when at least ``MIN_STYLES`` of its
drawings are used.

Split (class-disjoint, ``splits.assemble``): the classes are ordered by a hash of their
sequence, so the training and test halves both span every emoji category and a class keeps
its half when packages add or drop other classes. The rendering is cached in an ``.npz``
keyed by the packages' versions and the rendering settings.
"""

import dataclasses
import hashlib
import io
import json
import re
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..storage.files import atomic_write_bytes
from .loaders import EMOJI_AUGMENTATION, EMOJI_PACKAGE_FOLDER, find_node_modules
from .npz_cache import cached_arrays
from .splits import BenchmarkData, DatasetNotInstalled, TensorImageDataset, assemble
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RandomAffineImages

INSTALL = "npm ci --prefix benchmarks/data"
MIN_STYLES = 4
MIN_INK = 0.01  # least fraction of the canvas a drawing covers (alpha); less is a blank rendering
DUPLICATE_THRESHOLD = 0.003  # a style's drawing this close to its drawing of another class is left out
ANALYSIS_SIZE = 32  # pixels at which blank and shared drawings are judged, whatever the rendering size
BACKGROUND = (255, 255, 255)
RENDER_VERSION = 1  # raise when the code changes what is drawn
DEFAULT_CACHE = Path.home() / ".cache" / "pml-ice" / "emoji-styles"
VARIATION_SELECTORS = (0xFE0E, 0xFE0F)
SKIN_TONES = range(0x1F3FB, 0x1F400)


@dataclasses.dataclass(frozen=True)
class Style:
    """A drawing style: its npm package, and how a drawing's code points are found:
    ``chars`` (the set's chars.json), ``names`` (icon names through ``NAME_SOURCES``),
    ``unicode-names`` (icon names that are Unicode character names without spaces or
    punctuation) or ``files`` (OpenMoji's ``<folder>/<SEQUENCE>.svg``)."""

    name: str
    package: str
    code_points: str
    folder: str = ""


STYLES = (
    Style("fluent-flat", "@iconify-json/fluent-emoji-flat", "chars"),
    Style("fluent-color", "@iconify-json/fluent-emoji", "names"),
    Style("fluent-high-contrast", "@iconify-json/fluent-emoji-high-contrast", "chars"),
    Style("noto", "@iconify-json/noto", "chars"),
    Style("noto-v1", "@iconify-json/noto-v1", "names"),
    Style("twemoji", "@iconify-json/twemoji", "chars"),
    Style("openmoji-color", "openmoji", "files", "color/svg"),
    Style("openmoji-black", "openmoji", "files", "black/svg"),
    Style("emojione", "@iconify-json/emojione", "names"),
    Style("emojione-monotone", "@iconify-json/emojione-monotone", "names"),
    Style("emojione-v1", "@iconify-json/emojione-v1", "names"),
    Style("fxemoji", "@iconify-json/fxemoji", "unicode-names"),
)
# The Iconify sets whose chars.json names the emoji that the ``names`` styles draw.
NAME_SOURCES = ("@iconify-json/fluent-emoji-flat", "@iconify-json/fluent-emoji-high-contrast",
                "@iconify-json/noto", "@iconify-json/twemoji")

Key = Tuple[int, ...]


def packages() -> List[str]:
    """The npm packages the styles read, each once, in order."""
    return list(dict.fromkeys([s.package for s in STYLES] + list(NAME_SOURCES)))


def pinned_versions() -> Dict[str, str]:
    """The versions ``benchmarks/data/package.json`` pins."""
    with open(EMOJI_PACKAGE_FOLDER / "package.json", encoding="utf-8") as f:
        return json.load(f)["dependencies"]


def class_key(sequence: str) -> Optional[Key]:
    """The class of a code-point sequence written in hex ('1f44d-fe0f', '0023-FE0F-20E3'): its code
    points without variation selectors; None for a skin-tone variant or a private-use character."""
    points = tuple(int(part, 16) for part in sequence.split("-"))
    if any(p in SKIN_TONES or 0xE000 <= p <= 0xF8FF or p >= 0xF0000 for p in points):
        return None
    return tuple(p for p in points if p not in VARIATION_SELECTORS)


def key_text(key: Key) -> str:
    return "-".join(f"{p:04x}" for p in key)


def node_modules_root(root=None) -> Path:
    """The ``node_modules`` holding every style's package at the pinned version."""
    needed = packages()
    if root is None:
        found = find_node_modules(needed)
        if found is None:
            raise DatasetNotInstalled(
                f"emoji-styles: no node_modules with {', '.join(needed)} in the current folder, its parents, "
                f"{EMOJI_PACKAGE_FOLDER} or your home; install them with `{INSTALL}` (from the repository root) "
                "or pass --data-root PATH/TO/node_modules.")
        root = found
    root = Path(root)
    if root.name != "node_modules" and (root / "node_modules").is_dir():
        root = root / "node_modules"
    pins = pinned_versions()
    missing, wrong = [], []
    for package in needed:
        manifest = root / package / "package.json"
        if not manifest.is_file():
            missing.append(package)
            continue
        with open(manifest, encoding="utf-8") as f:
            version = json.load(f).get("version")
        if version != pins[package]:
            wrong.append(f"{package} {version} (pinned: {pins[package]})")
    if missing or wrong:
        problem = f"{', '.join(missing)} not found" if missing else f"{', '.join(wrong)} installed"
        raise DatasetNotInstalled(
            f"emoji-styles: {problem} under {root}; install the pinned packages with `{INSTALL}`.")
    return root


def _read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iconify_svg(icon_set: dict, name: str) -> str:
    """An Iconify icon as a standalone SVG document."""
    icon = icon_set["icons"][name]
    left, top = icon.get("left", icon_set.get("left", 0)), icon.get("top", icon_set.get("top", 0))
    width, height = icon.get("width", icon_set.get("width", 16)), icon.get("height", icon_set.get("height", 16))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {width} {height}" width="{width}" height="{height}">{icon["body"]}</svg>')


def _compact(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def name_keys(root: Path) -> Dict[str, Key]:
    """Icon name -> class, from the chars.json (and aliases) of ``NAME_SOURCES``; a name that two
    sources give different classes is left out."""
    found: Dict[str, set] = {}
    for package in NAME_SOURCES:
        icon_set, chars = _read_json(root / package / "icons.json"), _read_json(root / package / "chars.json")
        names: Dict[str, set] = {}
        for sequence, name in chars.items():
            key = class_key(sequence)
            if key is not None:
                names.setdefault(name, set()).add(key)
        for alias, target in icon_set.get("aliases", {}).items():
            if target["parent"] in names:
                names.setdefault(alias, set()).update(names[target["parent"]])
        for name, keys in names.items():
            found.setdefault(name, set()).update(keys)
    return {name: next(iter(keys)) for name, keys in found.items() if len(keys) == 1}


def unicode_name_keys(keys) -> Dict[str, Key]:
    """Compact Unicode character name ('alienmonster') -> class, for the single code points among ``keys``."""
    names = {}
    for key in keys:
        if len(key) == 1 and unicodedata.name(chr(key[0]), ""):
            names[_compact(unicodedata.name(chr(key[0])))] = key
    return names


def style_drawings(root: Path, style: Style, names: Dict[str, Key]) -> Dict[Key, str]:
    """Class -> SVG of every drawing of ``style``; of two drawings of one class, the one whose
    sequence (or icon name) sorts first, preferring icons Iconify does not mark hidden."""
    folder = root / style.package
    if style.code_points == "files":
        drawings = {}
        for path in sorted((folder / style.folder).glob("*.svg")):
            key = class_key(path.stem)
            if key is not None and key not in drawings:
                drawings[key] = path.read_text(encoding="utf-8")
        return drawings
    icon_set = _read_json(folder / "icons.json")
    if style.code_points == "chars":
        pairs = [(class_key(sequence), name) for sequence, name in _read_json(folder / "chars.json").items()]
    elif style.code_points == "names":
        pairs = [(names.get(name), name) for name in icon_set["icons"]]
    elif style.code_points == "unicode-names":
        by_unicode = unicode_name_keys(set(names.values()))
        pairs = [(by_unicode.get(_compact(name)), name) for name in icon_set["icons"]]
    else:
        raise ValueError(f"unknown code-point source {style.code_points!r} of style {style.name}")
    chosen: Dict[Key, str] = {}
    for key, name in sorted((p for p in pairs if p[0] is not None),
                            key=lambda p: (icon_set["icons"][p[1]].get("hidden", False), p[1])):
        chosen.setdefault(key, name)
    return {key: iconify_svg(icon_set, name) for key, name in chosen.items()}


def render(svg: str, size: int) -> Tuple[np.ndarray, float]:
    """An SVG drawn into a ``size`` square by resvg (aspect kept, centred) on ``BACKGROUND``:
    RGB uint8 (size, size, 3), and the fraction of the canvas it covers."""
    from PIL import Image

    try:
        import resvg_py
    except ImportError as error:
        raise DatasetNotInstalled(
            f"emoji-styles: rendering needs resvg-py; `pip install resvg-py` (in the bench extra): {error}") from error
    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    with Image.open(io.BytesIO(bytes(png))) as image:  # fitted into the square: pad the shorter side
        canvas.paste(image.convert("RGBA"), ((size - image.width) // 2, (size - image.height) // 2))
    rgba = np.asarray(canvas, dtype=np.float32) / 255.0
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] * alpha + np.asarray(BACKGROUND, dtype=np.float32) / 255.0 * (1 - alpha)
    return np.round(rgb * 255).astype(np.uint8), float(alpha.mean())


def _shared_drawings(images: np.ndarray, threshold: float) -> np.ndarray:
    """Which of one style's images (N, S, S, 3) nearly equal another of them:
    ``|a - b|^2 / (|a|^2 + |b|^2) < threshold`` on the ink (the distance from white)."""
    ink = (255.0 - images.reshape(len(images), -1).astype(np.float32)) / 255.0
    squared = (ink * ink).sum(axis=1)
    total = squared[:, None] + squared[None, :]
    near = total - 2.0 * (ink @ ink.T) < threshold * np.maximum(total, 1e-12)
    np.fill_diagonal(near, False)
    return near.any(axis=1)


def select_drawings(root: Path):
    """Every class any style draws: keys (C,), the styles' SVGs (class -> SVG per style), whether
    each style's drawing of each class is used (C, F), and the drawings at ``ANALYSIS_SIZE`` pixels
    (class -> image per style), at which they are judged whatever the rendering size: not blank
    (``MIN_INK``) and not shared with another class of the style (``DUPLICATE_THRESHOLD``)."""
    names = name_keys(root)
    drawings = [style_drawings(root, style, names) for style in STYLES]
    keys = sorted(set().union(*drawings))
    row = {key: i for i, key in enumerate(keys)}
    used = np.zeros((len(keys), len(STYLES)), dtype=bool)
    small: List[Dict[Key, np.ndarray]] = []
    for s, per_style in enumerate(drawings):
        drawn = list(per_style)
        rendered = [render(per_style[key], ANALYSIS_SIZE) for key in drawn]
        small.append({key: image for key, (image, _) in zip(drawn, rendered)})
        if drawn:
            inked = np.array([ink >= MIN_INK for _, ink in rendered])
            shared = _shared_drawings(np.stack([image for image, _ in rendered]), DUPLICATE_THRESHOLD)
            used[[row[key] for key in drawn], s] = inked & ~shared
    return keys, drawings, used, small


def render_styles(root: Path, size: int):
    """Classes with at least ``MIN_STYLES`` used drawings (``select_drawings``): keys (C,) as hex
    text, images (N, size, size, 3) uint8, and the class (N,) and style (N,) of each image, in
    style order within a class."""
    keys, drawings, used, small = select_drawings(root)
    kept = np.flatnonzero(used.sum(axis=1) >= MIN_STYLES)
    class_of, style_of = np.nonzero(used[kept])
    images = [small[s][keys[kept[c]]] if size == ANALYSIS_SIZE else render(drawings[s][keys[kept[c]]], size)[0]
              for c, s in zip(class_of, style_of)]
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return np.array([key_text(keys[k]) for k in kept]), stacked, class_of.astype(np.int64), style_of.astype(np.int64)


def cache_key(root: Path, size: int) -> str:
    """Hash of what the rendering depends on: the packages' versions, the styles, the settings,
    resvg's and Unicode's versions."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        resvg_version = version("resvg-py")
    except PackageNotFoundError:
        resvg_version = None
    installed = {p: _read_json(root / p / "package.json").get("version") for p in packages()}
    return hashlib.sha256(json.dumps({
        "version": RENDER_VERSION, "size": size, "background": BACKGROUND, "min_styles": MIN_STYLES,
        "min_ink": MIN_INK, "duplicate_threshold": DUPLICATE_THRESHOLD, "analysis_size": ANALYSIS_SIZE,
        "styles": [dataclasses.astuple(s) for s in STYLES], "name_sources": NAME_SOURCES,
        "packages": installed, "resvg": resvg_version, "unicode": unicodedata.unidata_version,
    }, sort_keys=True).encode()).hexdigest()[:16]


def cached_render(root: Path, size: int, cache_dir=None):
    """``render_styles``, rendered once and then read from ``cache_dir/emoji-styles-<key>.npz``
    (a cache that cannot be read, e.g. truncated, is rendered again)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE

    def rendered():
        keys, images, class_of, style_of = render_styles(root, size)
        return dict(keys=keys, images=images, class_of=class_of, style_of=style_of,
                    styles=np.array([s.name for s in STYLES]))

    names = ("keys", "images", "class_of", "style_of")
    stored = cached_arrays(cache_dir / f"emoji-styles-{cache_key(root, size)}.npz", names, rendered,
                           "emoji-styles", "remove it or make it a folder.")
    return tuple(stored[name] for name in names)


def hashed_order(keys: Sequence[str]) -> np.ndarray:
    """The label of each class: its rank when the classes are sorted by a hash of their key."""
    ranks = sorted(range(len(keys)), key=lambda i: hashlib.sha256(str(keys[i]).encode()).hexdigest())
    labels = np.empty(len(keys), dtype=np.int64)
    labels[ranks] = np.arange(len(keys))
    return labels


def load_emoji_styles(root=None, image_size=32, val_mode="auto", limit=None, *, cache_dir=None) -> BenchmarkData:
    """Emoji styles at ``image_size`` pixels: ``root`` is the ``node_modules`` folder (found as for
    ``emoji`` when None), ``limit`` keeps the first N styles of each class; training images get
    the emoji set's random affine map, validation and test images none. ``cache_dir`` defaults
    to ~/.cache/pml-ice/emoji-styles."""
    root = node_modules_root(root)
    keys, images, class_of, _ = cached_render(root, image_size, cache_dir)
    labels = hashed_order(keys)[class_of]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)  # in place: 3 GB at 128 px
    pixels.sub_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)).div_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    data = assemble(TensorImageDataset(pixels, labels), val_mode, limit)
    data.train = RandomAffineImages(data.train.images, data.train.labels, **EMOJI_AUGMENTATION)
    return data


CONTACT_SHEET_CLASSES = ("1f600", "2764", "1f525", "1f308", "0023-20e3", "1f1ec-1f1e7", "1f469-200d-1f4bb",
                         "1f44d", "1f9e0", "2744", "1f30d", "2b1c")


def contact_sheet(path, root=None, classes: Sequence[str] = CONTACT_SHEET_CLASSES, size=64) -> None:
    """A PNG of ``classes`` (rows, keys as hex text) drawn by every style (columns) at ``size``
    pixels: a grey cell where a style does not draw a class, a red frame around a drawing the
    dataset leaves out (blank, or shared with another class)."""
    from PIL import Image, ImageDraw

    root = node_modules_root(root)
    keys, drawings, used, _ = select_drawings(root)
    row_of = {key: i for i, key in enumerate(keys)}
    label_width, header, pad = 110, 34, 4
    cell = size + pad
    sheet = Image.new("RGB", (label_width + cell * len(STYLES), header + cell * len(classes)), (200, 200, 200))
    draw = ImageDraw.Draw(sheet)
    for s, style in enumerate(STYLES):
        draw.text((label_width + s * cell, 2 + (s % 3) * 10), style.name, fill=(0, 0, 0))  # staggered: no overlap
    for row, text in enumerate(classes):
        key, y = class_key(text), header + row * cell
        draw.text((4, y + size // 2 - 5), text, fill=(0, 0, 0))
        for s, per_style in enumerate(drawings):
            if key in per_style:
                x = label_width + s * cell
                sheet.paste(Image.fromarray(render(per_style[key], size)[0]), (x, y))
                if not used[row_of[key], s]:
                    draw.rectangle((x, y, x + size - 1, y + size - 1), outline=(220, 0, 0), width=3)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


if __name__ == "__main__":
    import sys

    contact_sheet(sys.argv[1] if len(sys.argv) > 1 else "docs/img/emoji_styles_contact_sheet.png")
