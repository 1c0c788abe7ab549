"""The built-in "hard" corpus: deterministic, tags agree with masks, several small objects per
image, every class common, colour alone does not tell the class, and write_corpus writes it."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from psa_ray.data import CORPORA, HardConfig, SyntheticConfig, write_corpus
from psa_ray.data.hard import CLASS_NAMES, make_sample
from psa_ray.io.inputs import read_corpus

C = len(CLASS_NAMES)


@pytest.fixture(scope="module")
def corpus():
    """The first 60 images of the default corpus (seed 0), generated once for the module."""
    return [make_sample(i, HardConfig()) for i in range(60)]


def test_same_seed_same_bytes_other_seed_other_images():
    config = HardConfig(seed=5)
    for index in (0, 3):
        a, b = make_sample(index, config), make_sample(index, config)
        assert a.image_id == b.image_id == f"hard_{index:06d}"
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
        assert a.tags == b.tags
    first = [make_sample(i, config).image for i in range(2)]
    other = [make_sample(i, replace(config, seed=6)).image for i in range(2)]
    assert all(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_shapes_and_tags_agree_with_mask(corpus):
    config = HardConfig()
    for s in corpus:
        assert s.image.dtype == np.uint8 and s.mask.dtype == np.uint8 and s.image.shape == s.mask.shape + (3,)
        assert all(96 <= n <= 160 for n in s.mask.shape)
        values = set(np.unique(s.mask).tolist())
        assert values <= set(range(C + 1)), "0 background, 1..C classes, no ignore value"
        in_mask = sorted(v for v in values if v > 0)
        assert s.tags == [CLASS_NAMES[v - 1] for v in in_mask], "tags = mask classes, in class order"
        for v in in_mask:
            assert (s.mask == v).sum() >= config.min_visible_fraction * s.mask.size


def _components(region: np.ndarray) -> int:
    """The number of 4-connected components of region [H,W] bool (label propagation)."""
    labels = np.where(region, np.arange(region.size).reshape(region.shape), -1)
    while True:
        padded = np.pad(labels, 1, constant_values=-1)
        neighbours = np.stack([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                               padded[1:-1, :-2], padded[1:-1, 2:]])
        grown = np.where(region, neighbours.max(axis=0), -1)
        if np.array_equal(grown, labels):
            return len(np.unique(labels[region]))
        labels = grown


def test_several_objects_some_small(corpus):
    objects = [sum(_components(s.mask == k) for k in np.unique(s.mask) if k > 0) for s in corpus[:40]]
    assert np.mean(objects) >= 2.0, objects
    assert max(objects) >= 4
    areas = [(s.mask == k).mean() for s in corpus for k in np.unique(s.mask) if k > 0]
    assert min(areas) < 0.03 and np.median(areas) < 0.1, "small to medium objects"
    assert 0.05 < np.mean([(s.mask > 0).mean() for s in corpus]) < 0.35, "background is most of it"


def test_every_class_appears(corpus):
    presence = Counter(t for s in corpus for t in s.tags)
    assert set(presence) == set(CLASS_NAMES) and min(presence.values()) >= 6, presence


def test_colour_does_not_tell_the_class(corpus):
    """Objects' mean colours overlap across classes: a leave-one-out nearest neighbour on them is
    far from perfect, and each class has an object whose mean colour is close to another class's."""
    colours, labels = [], []
    for s in corpus:
        for k in np.unique(s.mask):
            if k > 0:
                colours.append(s.image[s.mask == k].mean(axis=0))
                labels.append(k)
    x, y = np.array(colours), np.array(labels)
    distance = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(distance, np.inf)
    assert (y[distance.argmin(axis=1)] == y).mean() < 0.5
    for k in range(1, C + 1):
        assert distance[np.ix_(y == k, y != k)].min() < 15.0, CLASS_NAMES[k - 1]


def test_write_corpus_with_a_hard_config(tmp_path):
    assert CORPORA == {"birds": SyntheticConfig, "hard": HardConfig}
    config = HardConfig(num_images=4, seed=2)
    manifest_uri = write_corpus(str(tmp_path / "corpus"), config)
    assert (tmp_path / "corpus" / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
    corpus, errors = read_corpus(manifest_uri)
    assert errors == [] and corpus.class_names == list(CLASS_NAMES)
    assert [r.image_id for r in corpus.rows] == [f"hard_{i:06d}" for i in range(4)]
    assert [r.tags for r in corpus.rows] == [make_sample(i, config).tags for i in range(4)]
    with pytest.raises(TypeError):
        write_corpus(str(tmp_path / "other"), object())  # type: ignore[arg-type]
