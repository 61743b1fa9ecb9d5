"""The glyphs dataset on a few characters and fonts: rendering, homoglyphs, split, cache, errors."""

import numpy as np
import pytest
import torch

from benchmarks.data import glyphs
from benchmarks.data.splits import DatasetNotInstalled

FONTS = ("DejaVuSans.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralBolIta.ttf")
LATIN = [ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"]
GREEK_ALPHA, CYRILLIC_A, A_GRAVE = 0x391, 0x410, 0xC0


def classes_of(split):
    return set(np.unique(split.labels).tolist())


def test_rendering_is_deterministic_and_keeps_case_and_baseline():
    paths = glyphs.font_paths(fonts=FONTS)
    code_points, images, present = glyphs.render_fonts(paths, [ord("o"), ord("g"), ord("O")])
    again = glyphs.render_fonts(paths, [ord("O"), ord("g"), ord("o")])
    assert np.array_equal(images, again[1]) and np.array_equal(present, again[2])
    assert code_points.tolist() == [ord("O"), ord("g"), ord("o")]
    assert present.all() and images.shape == (3, len(FONTS), glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE)
    capital_o, g, o = (np.flatnonzero(images[i, 0].max(axis=1) > 128) for i in range(3))
    # Same baseline for 'o' and 'O', the capital taller; the descender of 'g' goes below it.
    assert abs(o[-1] - capital_o[-1]) <= 1 and capital_o[0] < o[0] - 3
    assert g[-1] > o[-1] + 2


def test_characters_need_min_fonts_that_draw_them(monkeypatch):
    paths = glyphs.font_paths(fonts=FONTS[:3])
    # Pretend the three fonts cover A, B and C unevenly; with MIN_FONTS = 2 only A and B stay.
    coverage = {paths[0]: [65, 66, 67], paths[1]: [65, 66], paths[2]: [65]}
    monkeypatch.setattr(glyphs, "drawable_code_points", coverage.__getitem__)
    monkeypatch.setattr(glyphs, "MIN_FONTS", 2)
    code_points, images, present = glyphs.render_fonts(paths)
    assert code_points.tolist() == [65, 66]
    assert present.tolist() == [[True, True, True], [True, True, False]]
    assert images[1, 2].max() == 0 and images[1, 1].max() > 128


def test_only_glyphs_that_overflow_are_shrunk():
    (path,) = glyphs.font_paths(fonts=("DejaVuSans.ttf",))
    assert glyphs._fitting_font(path, "W")[0].size == glyphs.FONT_SIZE
    # PER TEN THOUSAND SIGN is wider than the canvas at the fixed size: drawn smaller, not cut.
    font, left, right = glyphs._fitting_font(path, "\u2031")
    assert font.size < glyphs.FONT_SIZE and right - left <= glyphs.IMAGE_SIZE
    image = glyphs.render_glyph(path, "\u2031")
    assert image.max() > 128


def test_homoglyph_rule_on_synthetic_images():
    """Nearly identical in at least half of the shared fonts: one group, represented by the widest member."""
    rng = np.random.default_rng(0)
    b, c, d, e = (rng.integers(0, 256, size=(3, 8, 8)).astype(np.uint8) for _ in range(4))
    empty = np.zeros((8, 8), np.uint8)
    images = np.stack([
        b,                                   # 0
        np.stack([b[0], b[1], c[2]]),        # 1: like 0 in two of three fonts -> homoglyph of 0
        np.stack([b[0], d[1], d[2]]),        # 2: like 0 and 1 in one of three -> distinct
        e,                                   # 3: distinct
        np.stack([empty, b[1], b[2]]),       # 4: identical to 0 in the two fonts that draw it
    ])
    present = np.ones((5, 3), dtype=bool)
    present[4, 0] = False
    representative = glyphs.homoglyph_groups(images, present)
    assert representative.tolist() == [0, 0, 2, 3, 0]
    # The member present in more fonts represents the group, whatever its position.
    assert glyphs.homoglyph_groups(images[[4, 0]], present[[4, 0]]).tolist() == [1, 1]


def test_latin_greek_and_cyrillic_capital_a_are_one_class():
    paths = glyphs.font_paths(fonts=FONTS)
    code_points, images, present = glyphs.glyph_set(paths, [ord("A"), A_GRAVE, GREEK_ALPHA, CYRILLIC_A, ord("a")])
    assert code_points.tolist() == [ord("A"), ord("a"), A_GRAVE]
    assert images.shape[:2] == present.shape == (3, len(FONTS))


def load(tmp_path, **kwargs):
    return glyphs.load_glyphs(tmp_path / "cache", fonts=FONTS, code_points=LATIN, **kwargs)


def test_split_alternates_classes_and_is_class_disjoint(tmp_path):
    data = load(tmp_path, test_every=1)
    train, val, test = classes_of(data.train), classes_of(data.val), classes_of(data.test)
    assert not (train & val or train & test or val & test)
    # 52 letters in code-point order: even positions train (every fifth of them validates), odd test.
    assert test == set(range(1, 52, 2))
    assert val == {8, 18, 28, 38, 48}
    assert train | val == set(range(0, 52, 2))
    assert len(data.train) == len(FONTS) * len(train) and data.train[0][0].shape[0] == 1
    assert classes_of(load(tmp_path).test) == set(range(1, 52, 6))  # every third test class by default
    samples = load(tmp_path, val_mode="samples", test_every=1)
    assert classes_of(samples.val) <= classes_of(samples.train) == set(range(0, 52, 2))


def test_augmentation_only_in_training(tmp_path):
    data = load(tmp_path)
    image, label = data.test[0]
    assert torch.equal(image, data.test.images[0]) and label == data.test.labels[0]
    torch.manual_seed(0)
    batch = data.train.__getitems__([0, 1, 2])
    torch.manual_seed(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batch, data.train.__getitems__([0, 1, 2])))
    warped = torch.stack([b[0] for b in batch])
    assert warped.shape == (3, 1, glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE)
    assert [b[1] for b in batch] == data.train.labels[:3].tolist()
    assert not torch.equal(warped, data.train.images[:3])
    assert warped[:, :, 0, :].max() < -0.99  # the background stays background
    assert (warped - data.train.images[:3]).abs().mean() < 0.5


def test_cache_is_reused_without_rendering(tmp_path, monkeypatch):
    first = load(tmp_path)
    assert len(list((tmp_path / "cache").glob("glyphs-*.npz"))) == 1

    def no_rendering(*args):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(glyphs, "render_glyph", no_rendering)
    second = load(tmp_path)
    assert torch.equal(first.test.images, second.test.images)
    assert np.array_equal(first.train.labels, second.train.labels)
    with pytest.raises(AssertionError, match="rendered again"):
        glyphs.load_glyphs(tmp_path / "cache", fonts=FONTS, code_points=LATIN[:20])


def test_clear_errors_for_missing_fonts_and_bad_cache(tmp_path):
    with pytest.raises(DatasetNotInstalled, match=r"DejaVuSans.ttf.*not found in .*matplotlib"):
        glyphs.load_glyphs(tmp_path, font_dir=tmp_path, fonts=FONTS, code_points=LATIN)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DatasetNotInstalled, match="is a file"):
        glyphs.load_glyphs(tmp_path / "file", fonts=FONTS, code_points=LATIN)
    with pytest.raises(ValueError, match="at least 10 classes"):
        glyphs.load_glyphs(tmp_path / "cache", fonts=FONTS, code_points=LATIN[:6])


def test_a_truncated_cache_is_rendered_again(tmp_path):
    first = load(tmp_path)
    cache, = (tmp_path / "cache").glob("glyphs-*.npz")
    whole = cache.read_bytes()
    cache.write_bytes(whole[: len(whole) // 2])
    again = load(tmp_path)
    assert torch.equal(first.test.images, again.test.images)
    assert cache.read_bytes() == whole
