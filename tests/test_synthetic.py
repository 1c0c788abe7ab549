"""The built-in synthetic corpus: deterministic, tags agree with masks, distractors stay untagged,
write_corpus lays out a readable manifest, and the split is a stable partition."""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from psa_ray.io.keys import is_held_out
from psa_ray.data.synthetic import (
    CLASS_NAMES, SyntheticConfig, make_sample, write_corpus)

C = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def corpus():
    """The first 300 images of the default corpus (seed 0), generated once for the module."""
    return [make_sample(i, SyntheticConfig()) for i in range(300)]


def test_same_seed_same_bytes_other_seed_other_images():
    config = SyntheticConfig(seed=11)
    for index in (0, 5):
        a, b = make_sample(index, config), make_sample(index, config)
        assert a.image_id == b.image_id == f"syn_{index:06d}"
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
        assert a.tags == b.tags
    first = [make_sample(i, config).image for i in range(4)]
    other = [make_sample(i, replace(config, seed=12)).image for i in range(4)]
    assert all(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_sizes_vary_within_bounds(corpus):
    shapes = [s.image.shape for s in corpus]
    assert all(s.image.dtype == np.uint8 and s.mask.dtype == np.uint8 for s in corpus)
    assert all(s.mask.shape == s.image.shape[:2] and s.image.shape[2] == 3 for s in corpus)
    heights, widths = {h for h, _, _ in shapes}, {w for _, w, _ in shapes}
    assert min(heights) >= 96 and max(heights) <= 160 and min(widths) >= 96 and max(widths) <= 160
    assert len(heights) > 30 and len(widths) > 30, "heights and widths each spread over the range"
    assert sum(h != w for h, w, _ in shapes) > 250, "height and width are drawn independently"
    small = SyntheticConfig(min_size=64, max_size=72, seed=3)
    for i in range(6):
        h, w = make_sample(i, small).mask.shape
        assert 64 <= h <= 72 and 64 <= w <= 72


def test_tags_agree_with_mask(corpus):
    config = SyntheticConfig()
    for s in corpus:
        values = set(np.unique(s.mask).tolist())
        assert values <= set(range(C + 1)), "0 background, 1..C classes, no ignore value"
        in_mask = sorted(v for v in values if v > 0)
        assert s.tags == [CLASS_NAMES[v - 1] for v in in_mask], "tags = mask classes, in class order"
        for v in in_mask:
            assert (s.mask == v).sum() >= config.min_visible_fraction * s.mask.size
        assert 1 <= len(s.tags) <= config.max_objects


def test_object_count_follows_max_objects(corpus):
    tag_counts = Counter(len(s.tags) for s in corpus)
    assert tag_counts[1] > 0 and tag_counts[2] > 0 and tag_counts[3] > 0, tag_counts
    single = SyntheticConfig(max_objects=1, seed=4)
    assert all(len(make_sample(i, single).tags) == 1 for i in range(10))


def test_foreground_is_a_minority_of_pixels(corpus):
    fraction = np.mean([(s.mask > 0).mean() for s in corpus])
    assert 0.1 < fraction < 0.5


def _dilate(region: np.ndarray) -> np.ndarray:
    """[H,W] bool grown by one pixel in all 8 directions."""
    padded = np.pad(region, 1)
    height, width = region.shape
    return np.any([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)


def test_distractors_change_only_background(corpus):
    """Same seed with and without distractors: same size, mask and tags; the images differ only on
    background pixels (and object pixels next to them, through the 1-pixel blur)."""
    clean = SyntheticConfig(max_distractors=0)
    with_distractors = 0
    for index in range(30):
        cluttered, plain = corpus[index], make_sample(index, clean)
        assert cluttered.tags == plain.tags and np.array_equal(cluttered.mask, plain.mask)
        differs = np.any(cluttered.image != plain.image, axis=-1)
        assert not np.any(differs & ~_dilate(cluttered.mask == 0))
        with_distractors += differs.mean() > 0.01
    assert 15 <= with_distractors < 30, "distractors in most images, but not all"


def test_every_class_is_common(corpus):
    presence = Counter(t for s in corpus for t in s.tags)
    assert set(presence) == set(CLASS_NAMES)
    assert min(presence.values()) >= 0.1 * len(corpus), presence


def test_write_corpus_files_and_manifest(tmp_path):
    config = SyntheticConfig(num_images=5, seed=2)
    root = str(tmp_path / "corpus")
    manifest_uri = write_corpus(root, config)
    assert manifest_uri == f"{root}/manifest.parquet"
    assert (tmp_path / "corpus" / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
    table = pq.read_table(manifest_uri)
    assert table.column_names == ["image_id", "image", "tags"]
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == [f"syn_{i:06d}" for i in range(5)]
    for i, row in enumerate(rows):
        sample = make_sample(i, config)
        assert row["image"] == f"images/{sample.image_id}.png" and row["tags"] == sample.tags
        image = Image.open(tmp_path / "corpus" / row["image"])
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), sample.image)
        gt = Image.open(tmp_path / "corpus" / "gt" / f"{sample.image_id}.png")
        assert gt.mode == "P" and np.array_equal(np.asarray(gt), sample.mask)
    png = tmp_path / "corpus" / "images" / "syn_000003.png"
    first = png.read_bytes()
    png.write_bytes(b"stale")
    write_corpus(root, config)
    assert png.read_bytes() == first, "rewritten with the same bytes"
    assert Image.open(io.BytesIO(first)).size == make_sample(3, config).image.shape[1::-1]


def test_the_held_out_rule_is_a_stable_partition_by_id():
    """The one held-out rule of every job (`io.keys.is_held_out`): by a digest of each id, so the
    same ids give the same split in any order, and about the share asked for."""
    ids = [f"syn_{i:06d}" for i in range(2000)]
    held = is_held_out(ids, 0.2)
    assert 0.17 < held.mean() < 0.23
    assert (is_held_out(ids[::-1], 0.2)[::-1] == held).all(), "same ids, same split"
    assert not is_held_out(ids, 0.0).any()
    assert (is_held_out(ids, 0.1) <= held).all(), "a smaller share holds out a subset"
    with pytest.raises(ValueError):
        is_held_out(ids, 1.0)
