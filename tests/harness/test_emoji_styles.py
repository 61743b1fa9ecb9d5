"""The emoji-styles dataset on a fake node_modules written here: code points, class rule, split, cache, errors."""

import json
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.data import emoji_styles, registry
from benchmarks.data.splits import DatasetNotInstalled

ANIMALS = [f"{cp:x}" for cp in range(0x1F400, 0x1F414)]  # RAT .. ROOSTER: 20 classes every style draws
HEART, FRANCE, NORWAY, TECHNOLOGIST = "2764", "1f1eb-1f1f7", "1f1f3-1f1f4", "1f469-200d-1f4bb"
SKIN_TONE, ROCKET = "1f44d-1f3fb", "1f680"


def name_of(sequence):
    return f"emoji-{sequence}"


def body(index, style_index):
    """A rectangle whose place and shape tell the class and whose colour tells the style."""
    x, y = 2 + (index % 5) * 5, 2 + (index // 5) * 4
    return (f'<rect x="{x}" y="{y}" width="{6 + index % 3 * 3}" height="{5 + index % 4 * 2}" '
            f'fill="rgb({30 + style_index * 18},{(60 + index * 37) % 200},{(index * 53) % 255})"/>')


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def sequences_of(style):
    """What each fake style draws: every animal, the heart and the flags; the technologist
    (a ZWJ sequence) all but Firefox OS (named by single characters); the skin-tone variant
    where code points are written; the rocket only in three styles."""
    drawn = ANIMALS + [HEART, FRANCE, NORWAY]
    if style.code_points != "unicode-names":
        drawn.append(TECHNOLOGIST)
    if style.code_points in ("chars", "files"):
        drawn.append(SKIN_TONE)
    if style.name in ("noto", "twemoji", "openmoji-color"):
        drawn.append(ROCKET)
    return [s for s in drawn if style.code_points != "unicode-names" or "-" not in s]


def make_packages(root):
    """A node_modules with every style's package at its pinned version, drawings as ``sequences_of``."""
    pins = emoji_styles.pinned_versions()
    every = ANIMALS + [HEART, FRANCE, NORWAY, TECHNOLOGIST, SKIN_TONE, ROCKET]
    for s, style in enumerate(emoji_styles.STYLES):
        folder = root / style.package
        write_json(folder / "package.json", {"name": style.package, "version": pins[style.package]})
        drawn = sequences_of(style)
        if style.code_points == "files":
            (folder / style.folder).mkdir(parents=True, exist_ok=True)
            for sequence in drawn:
                if style.name == "openmoji-black" and sequence in (FRANCE, NORWAY):  # one outline for both
                    shape = '<rect x="4" y="8" width="24" height="16" fill="none" stroke="black"/>'
                else:
                    shape = body(every.index(sequence), s)
                file = sequence.upper() + ("-FE0F" if sequence == HEART else "") + ".svg"
                (folder / style.folder / file).write_text(
                    f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">{shape}</svg>')
            continue
        icons, chars = {}, {}
        for sequence in drawn:
            index = every.index(sequence)
            if style.code_points == "unicode-names":
                name = unicodedata.name(chr(int(sequence, 16))).lower().replace(" ", "")
            else:
                name = name_of(sequence)
            icons[name] = {"body": "" if (style.name == "twemoji" and sequence == ANIMALS[0]) else body(index, s)}
            # Noto writes the heart without U+FE0F, the others with it.
            chars[sequence + ("-fe0f" if sequence == HEART and style.name != "noto" else "")] = name
        write_json(folder / "icons.json", {"prefix": style.name, "width": 32, "height": 32, "icons": icons})
        write_json(folder / "chars.json", chars if style.code_points == "chars" else {})


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji-styles") / "node_modules"
    make_packages(root)
    return root


def test_class_key_drops_variation_selectors_skin_tones_and_private_use():
    assert emoji_styles.class_key("2764-fe0f") == emoji_styles.class_key("2764") == (0x2764,)
    assert emoji_styles.class_key("0023-FE0F-20E3") == (0x23, 0x20E3)
    assert emoji_styles.class_key("1f469-200d-1f4bb") == (0x1F469, 0x200D, 0x1F4BB)
    assert emoji_styles.class_key("1f44d-1f3fb") is None
    assert emoji_styles.class_key("1f3c3-1f3ff-200d-2642-fe0f") is None
    assert emoji_styles.class_key("e000") is None


def test_classes_need_four_styles_and_each_style_draws_a_class_once(packages, tmp_path):
    keys, images, class_of, style_of = emoji_styles.cached_render(packages, 32, tmp_path)
    expected = sorted(emoji_styles.class_key(s) for s in ANIMALS + [HEART, FRANCE, NORWAY, TECHNOLOGIST])
    assert keys.tolist() == [emoji_styles.key_text(k) for k in expected]  # no rocket (3 styles), no skin tone
    per_class = {keys[c]: int(n) for c, n in enumerate(np.bincount(class_of))}
    styles = len(emoji_styles.STYLES)
    assert per_class["2764"] == styles  # written with and without U+FE0F: one class, drawn by all
    assert per_class["1f401"] == styles
    assert per_class["1f400"] == styles - 1  # Twemoji's blank drawing is left out
    assert per_class["1f469-200d-1f4bb"] == styles - 1  # Firefox OS is mapped by single characters' names
    assert per_class["1f1eb-1f1f7"] == per_class["1f1f3-1f1f4"] == styles - 2  # and OpenMoji black's shared outline
    for c in range(len(keys)):
        drawn_by = style_of[class_of == c]
        assert len(set(drawn_by.tolist())) == len(drawn_by)
    assert images.shape == (len(class_of), 32, 32, 3) and images.dtype == np.uint8
    # The Fluent colour and Noto v1 drawings are found by name, Firefox OS's by Unicode name.
    for name in ("fluent-color", "noto-v1", "emojione-v1", "fxemoji"):
        s = [style.name for style in emoji_styles.STYLES].index(name)
        assert (class_of[style_of == s] == keys.tolist().index("1f401")).sum() == 1


def test_icon_names_map_through_the_name_sources_and_ambiguous_names_are_dropped(tmp_path):
    for package, chars in zip(emoji_styles.NAME_SOURCES, ({"1f600": "grinning"}, {"1f600": "grinning", "1f601": "beam"},
                                                          {"1f602": "joy"}, {"1f603": "joy"})):
        write_json(tmp_path / package / "chars.json", chars)
        write_json(tmp_path / package / "icons.json", {"icons": {name: {"body": ""} for name in chars.values()},
                                                       "aliases": {"old-beam": {"parent": "beam"}}})
    assert emoji_styles.name_keys(tmp_path) == {"grinning": (0x1F600,), "beam": (0x1F601,), "old-beam": (0x1F601,)}


def test_transparent_backgrounds_are_white_and_the_aspect_is_kept():
    wide = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 32"><rect width="64" height="32" fill="red"/></svg>'
    image, ink = emoji_styles.render(wide, 32)
    assert image.shape == (32, 32, 3) and ink == pytest.approx(0.5, abs=0.02)
    assert (image[0, 0] == 255).all() and (image[-1, -1] == 255).all()  # padding: the white background
    assert image[16, 16].tolist() == [255, 0, 0]


def test_split_is_class_disjoint_and_follows_the_hashed_order(packages, tmp_path):
    data = emoji_styles.load_emoji_styles(packages, 32, cache_dir=tmp_path)
    train, val, test = (set(np.unique(split.labels).tolist()) for split in (data.train, data.val, data.test))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(24))
    assert train | val == set(range(12)) and val == {9, 10, 11}
    assert data.train.images.shape[1:] == (3, 32, 32)
    assert isinstance(data.train, emoji_styles.RandomAffineImages) and data.train.padding == "border"
    # The order shuffles the classes (neighbours in code-point order land in both halves), and a
    # class keeps its place in it when another class is dropped.
    keys = [f"k{i}" for i in range(30)]
    full, fewer = emoji_styles.hashed_order(keys), emoji_styles.hashed_order(keys[:10] + keys[11:])
    assert sorted(full.tolist()) == list(range(30)) and (np.diff(full) < 0).sum() >= 5
    assert np.argsort(np.delete(full, 10)).tolist() == np.argsort(fewer).tolist()
    limited = emoji_styles.load_emoji_styles(packages, 32, limit=4, cache_dir=tmp_path)
    assert np.bincount(limited.test.labels)[sorted(test)].tolist() == [4] * len(test)


def test_the_cache_is_reused_and_its_key_follows_versions_and_rendering(packages, tmp_path, monkeypatch):
    first = emoji_styles.load_emoji_styles(packages, 32, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("emoji-styles-*.npz"))) == 1

    def no_rendering(*args):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(emoji_styles, "render", no_rendering)
    again = emoji_styles.load_emoji_styles(packages, 32, cache_dir=tmp_path)
    assert torch.equal(first.test.images, again.test.images)
    monkeypatch.undo()

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DatasetNotInstalled, match="emoji-styles: the cache folder .*file is a file"):
        emoji_styles.load_emoji_styles(packages, 32, cache_dir=tmp_path / "file")

    key = emoji_styles.cache_key(packages, 32)
    assert emoji_styles.cache_key(packages, 64) != key
    with monkeypatch.context() as patch:
        patch.setattr(emoji_styles, "BACKGROUND", (0, 0, 0))
        assert emoji_styles.cache_key(packages, 32) != key
    with monkeypatch.context() as patch:
        patch.setattr("importlib.metadata.version", lambda name: "99.0")
        assert emoji_styles.cache_key(packages, 32) != key
    manifest = packages / "@iconify-json" / "noto" / "package.json"
    original = manifest.read_text()
    try:
        manifest.write_text(json.dumps({"name": "@iconify-json/noto", "version": "0.0.1"}))
        assert emoji_styles.cache_key(packages, 32) != key
    finally:
        manifest.write_text(original)
    assert emoji_styles.cache_key(packages, 32) == key


def test_missing_or_other_versions_of_packages_say_npm_ci_in_one_line(packages, tmp_path, monkeypatch):
    with pytest.raises(DatasetNotInstalled) as error:
        registry.load_dataset("emoji-styles", root=tmp_path)
    message = str(error.value)
    assert "`npm ci --prefix benchmarks/data`" in message and "@iconify-json/noto" in message and "\n" not in message
    monkeypatch.setattr(emoji_styles, "find_node_modules", lambda packages: None)
    with pytest.raises(DatasetNotInstalled, match=r"no node_modules with .*npm ci --prefix benchmarks/data") as error:
        registry.load_dataset("emoji-styles")
    assert "\n" not in str(error.value)
    pins = emoji_styles.pinned_versions()
    monkeypatch.setattr(emoji_styles, "pinned_versions", lambda: {**pins, "openmoji": "99.0.0"})
    with pytest.raises(DatasetNotInstalled, match=r"openmoji 17\.0\.0 \(pinned: 99\.0\.0\) installed .*npm ci"):
        registry.load_dataset("emoji-styles", root=packages)


def test_contact_sheet_frames_the_drawings_left_out(packages, tmp_path):
    path = tmp_path / "sheet.png"
    emoji_styles.contact_sheet(path, packages, classes=("1f400", "1f401"), size=32)
    with Image.open(path) as sheet:
        assert sheet.size == (110 + 36 * len(emoji_styles.STYLES), 34 + 36 * 2)
        twemoji = [s.name for s in emoji_styles.STYLES].index("twemoji")
        assert sheet.getpixel((110 + 36 * twemoji + 1, 34 + 1)) == (220, 0, 0)  # the blank drawing, framed
        assert sheet.getpixel((110 + 36 * twemoji + 1, 34 + 36 + 1)) != (220, 0, 0)
