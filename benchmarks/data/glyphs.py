"""Glyphs: characters rendered from the fonts matplotlib ships, one class per character.

Every character drawn by at least ``MIN_FONTS`` of the 16 DejaVu and STIX General faces in
``matplotlib/mpl-data/fonts/ttf`` is a class, with one image per font that draws it.
Glyphs are drawn white on black at a fixed font size on a fixed baseline, centred
horizontally, so case and vertical position stay visible ('o' against 'O', ',' against
"'"); only a glyph that would overflow the canvas is drawn at a smaller size. Control,
format, private-use, space and combining characters are left out, and so are glyphs a
font draws empty.

Homoglyphs (Latin A, Greek Alpha, Cyrillic A, ...) would be classes that no model can
tell apart: two characters whose images are nearly identical (relative squared
difference below ``HOMOGLYPH_THRESHOLD``) in at least half of the fonts that draw both
are one group, and only its first member (most fonts, then lowest code point) is kept.

Split (class-disjoint): the classes in code-point order alternate between training (even
positions) and test (odd positions), so that both halves span the same scripts and
blocks; every fifth training class validates. Rendering takes about 10 s and is cached
in an ``.npz`` file keyed by a hash of the rendering settings and the font files.
"""

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .npz_cache import cached_arrays
from .splits import BenchmarkData, DatasetNotInstalled, TensorImageDataset, limit_per_class, validation_split
from .transforms import RandomAffineImages

GLYPH_FONTS = tuple(
    f"DejaVu{family}{style}.ttf"
    for family in ("Sans", "SansMono", "Serif")
    for style in (("", "-Bold", "-Oblique", "-BoldOblique") if family != "Serif" else ("", "-Bold", "-Italic", "-BoldItalic"))
) + ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf")
IMAGE_SIZE = 32
FONT_SIZE = 20
BASELINE = 23  # pixels from the top of the canvas
MIN_FONTS = 8
MIN_INK = 8  # a glyph with less total ink (in units of one full pixel) is empty
HOMOGLYPH_THRESHOLD = 0.01
EXCLUDED_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Mc", "Me")
RENDER_VERSION = 2  # raise when the rendering code changes what it draws
DEFAULT_CACHE = Path.home() / ".cache" / "pml-ice" / "glyphs"


def matplotlib_font_dir() -> Path:
    """The folder of the TrueType fonts that matplotlib ships."""
    try:
        import matplotlib
    except ImportError as error:
        raise DatasetNotInstalled(f"glyphs: the fonts come with matplotlib; `pip install matplotlib` ({error})") from error
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths(font_dir: Optional[Path] = None, fonts: Sequence[str] = GLYPH_FONTS) -> List[Path]:
    """Paths of ``fonts`` in ``font_dir`` (matplotlib's by default); a clear error if any is missing."""
    font_dir = Path(font_dir) if font_dir is not None else matplotlib_font_dir()
    missing = [name for name in fonts if not (font_dir / name).is_file()]
    if missing:
        raise DatasetNotInstalled(
            f"glyphs: font file(s) {', '.join(missing)} not found in {font_dir}. They ship with "
            "matplotlib (`pip install matplotlib`, in the bench extra); reinstall it if they were removed."
        )
    return [font_dir / name for name in fonts]


def drawable_code_points(path: Path) -> List[int]:
    """Code points the font maps to a glyph, without control, space, private-use or combining characters."""
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True) as font:
        cmap = font.getBestCmap() or {}
    return sorted(c for c in cmap if unicodedata.category(chr(c)) not in EXCLUDED_CATEGORIES)


def _fitting_font(path: Path, character: str):
    """The font at ``FONT_SIZE``, or at the largest smaller size at which the glyph fits the canvas."""
    from PIL import ImageFont

    size = FONT_SIZE
    while True:
        font = ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)
        left, top, right, bottom = font.getbbox(character, anchor="ls")
        if (right - left <= IMAGE_SIZE and top >= -BASELINE and bottom <= IMAGE_SIZE - BASELINE) or size == 1:
            return font, left, right
        size -= 1


def render_glyph(path: Path, character: str) -> np.ndarray:
    """One glyph, white on black (uint8, IMAGE_SIZE x IMAGE_SIZE), on the fixed baseline."""
    from PIL import Image, ImageDraw

    font, left, right = _fitting_font(path, character)
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    x = (IMAGE_SIZE - (right - left)) / 2 - left
    ImageDraw.Draw(image).text((x, BASELINE), character, fill=255, font=font, anchor="ls")
    return np.asarray(image, dtype=np.uint8)


def render_fonts(paths: Sequence[Path], code_points: Optional[Sequence[int]] = None):
    """Code points (C,), their images in each font (C, F, S, S; zeros where absent) and presence (C, F).

    By default every code point that at least ``MIN_FONTS`` fonts draw (not empty); given
    ``code_points`` are kept when one font draws them.
    """
    per_font = [set(drawable_code_points(p)) for p in paths]
    min_fonts = MIN_FONTS if code_points is None else 1
    if code_points is None:
        counts: Dict[int, int] = {}
        for covered in per_font:
            for c in covered:
                counts[c] = counts.get(c, 0) + 1
        code_points = [c for c, n in counts.items() if n >= min_fonts]
    code_points = np.array(sorted(set(code_points)), dtype=np.int64)
    images = np.zeros((len(code_points), len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for f, (path, covered) in enumerate(zip(paths, per_font)):
        for i, c in enumerate(code_points):
            if c in covered:
                images[i, f] = render_glyph(path, chr(c))
    present = images.reshape(len(code_points), len(paths), -1).sum(axis=2, dtype=np.int64) >= MIN_INK * 255
    images[~present] = 0
    keep = present.sum(axis=1) >= min_fonts
    return code_points[keep], images[keep], present[keep]


def homoglyph_groups(images: np.ndarray, present: np.ndarray, threshold: float = HOMOGLYPH_THRESHOLD) -> np.ndarray:
    """For every class, the index of the class that represents its homoglyph group.

    Classes a and b are homoglyphs when they share a font and, in at least half of the fonts
    they share, ``|x_a - x_b|^2 / (|x_a|^2 + |x_b|^2) < threshold`` (0 for identical images,
    1 for images without common ink; accents on a letter give 0.02 to 0.08). Groups are the connected components of that relation; the
    representative is the member present in the most fonts, then the first.
    """
    num_classes, num_fonts = present.shape
    shared = present.astype(np.int32) @ present.T.astype(np.int32)
    similar = np.zeros((num_classes, num_classes), dtype=np.int32)
    for f in range(num_fonts):
        members = np.flatnonzero(present[:, f])
        x = images[members, f].reshape(len(members), -1).astype(np.float32) / 255.0
        squared = (x * x).sum(axis=1)
        total = squared[:, None] + squared[None, :]
        difference = total - 2.0 * (x @ x.T)
        near = difference < threshold * total
        similar[np.ix_(members, members)] += near
    homoglyph = (2 * similar >= shared) & (shared > 0)
    np.fill_diagonal(homoglyph, False)
    parent = np.arange(num_classes)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(homoglyph))):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(num_classes)])
    coverage = present.sum(axis=1)
    representative = np.arange(num_classes)
    for group in np.unique(roots):
        members = np.flatnonzero(roots == group)
        best = members[np.lexsort((members, -coverage[members]))[0]]
        representative[members] = best
    return representative


def glyph_set(paths: Sequence[Path], code_points: Optional[Sequence[int]] = None):
    """Rendered classes without homoglyphs: code points (C,), images (C, F, S, S), presence (C, F)."""
    code_points, images, present = render_fonts(paths, code_points)
    keep = np.flatnonzero(homoglyph_groups(images, present) == np.arange(len(code_points)))
    return code_points[keep], images[keep], present[keep]


def cache_key(paths: Sequence[Path], code_points: Optional[Sequence[int]] = None) -> str:
    """Hash of everything the rendering depends on: settings, Pillow's and Unicode's versions, the font files."""
    import PIL

    digest = hashlib.sha256(json.dumps({
        "version": RENDER_VERSION, "image_size": IMAGE_SIZE, "font_size": FONT_SIZE, "baseline": BASELINE,
        "min_fonts": MIN_FONTS, "min_ink": MIN_INK, "homoglyph_threshold": HOMOGLYPH_THRESHOLD,
        "excluded": EXCLUDED_CATEGORIES, "pillow": PIL.__version__, "unicode": unicodedata.unidata_version,
        "code_points": None if code_points is None else [int(c) for c in code_points],
        "fonts": [p.name for p in paths],
    }, sort_keys=True).encode())
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cached_glyph_set(cache_dir=None, font_dir=None, fonts: Sequence[str] = GLYPH_FONTS,
                     code_points: Optional[Sequence[int]] = None):
    """``glyph_set`` of the fonts, rendered once and then read from ``cache_dir/glyphs-<key>.npz``
    (a cache that cannot be read, e.g. truncated, is rendered again)."""
    paths = font_paths(font_dir, fonts)
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE

    def rendered():
        code_points_, images, present = glyph_set(paths, code_points)
        return dict(code_points=code_points_, images=images, present=present, fonts=np.array(fonts))

    stored = cached_arrays(cache_dir / f"glyphs-{cache_key(paths, code_points)}.npz",
                           ("code_points", "images", "present"), rendered, "glyphs",
                           "pass --data-root DIR, a folder.")
    return stored["code_points"], stored["images"], stored["present"]


def alternating_split(num_classes: int, test_every: int = 1):
    """Class indices of (train, val, test) in code-point order: even positions train and every
    fifth of them validates; odd positions test, of which every ``test_every``-th is kept."""
    if num_classes < 10:
        raise ValueError(f"glyphs: the alternating split needs at least 10 classes, got {num_classes}")
    if test_every < 1:
        raise ValueError(f"glyphs: test_every must be at least 1, got {test_every}")
    train = np.arange(0, num_classes, 2)
    test = np.arange(1, num_classes, 2)[::test_every]
    in_val = np.zeros(len(train), dtype=bool)
    in_val[4::5] = True
    return train[~in_val], train[in_val], test


def load_glyphs(root=None, val_mode="auto", limit=None, test_every=3, *, font_dir=None, fonts: Sequence[str] = GLYPH_FONTS,
                code_points: Optional[Sequence[int]] = None) -> BenchmarkData:
    """Glyphs: ``root`` is the cache folder (default ~/.cache/pml-ice/glyphs); ``limit`` fonts per class.

    ``val_mode`` "auto" or "classes" validates on every fifth training class, "samples" on
    every fifth image of each training class. The test split keeps every ``test_every``-th
    test class: 3 (the default) cuts the cost of evaluating every epoch to a third, 1 keeps all.
    ``font_dir``, ``fonts`` and ``code_points`` select a subset (tests).
    """
    code_points, images, present = cached_glyph_set(root, font_dir, fonts, code_points)
    class_of, font_of = np.nonzero(present)
    pixels = torch.from_numpy(images[class_of, font_of]).float().unsqueeze(1)
    keep = limit_per_class(class_of, limit)
    pixels, labels = (pixels[keep] / 255.0 - 0.5) / 0.5, class_of[keep]
    train_classes, val_classes, test_classes = alternating_split(len(code_points), test_every)
    if val_mode == "samples":
        train_classes = np.sort(np.concatenate([train_classes, val_classes]))
    elif val_mode not in ("auto", "classes"):
        raise ValueError(f"unknown validation mode '{val_mode}'; valid: auto, classes, samples")
    in_train = np.isin(labels, train_classes)
    train = RandomAffineImages(pixels[in_train], labels[in_train])
    if val_mode == "samples":
        train_idx, val_idx = validation_split(train.labels, "samples")
        train, val = train.subset(train_idx), TensorImageDataset(train.images[val_idx], train.labels[val_idx])
    else:
        in_val = np.isin(labels, val_classes)
        val = TensorImageDataset(pixels[in_val], labels[in_val])
    in_test = np.isin(labels, test_classes)
    test = TensorImageDataset(pixels[in_test], labels[in_test])
    return BenchmarkData(train=train, val=val, test=test)
