"""Pair set, feature affinities, seed labels, affinity labels and loss against brute-force references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psa_ray.ops.affinity import (AffinityLabels, affinity_labels, affinity_loss, feature_affinities,
                                  pair_offsets, confident_seeds)


def test_pair_offsets_by_hand() -> None:
    assert pair_offsets(1) == []
    assert pair_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert pair_offsets(3) == [(0, 1), (0, 2),
                               (1, -2), (1, -1), (1, 0), (1, 1), (1, 2),
                               (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]
    assert len(pair_offsets(5)) == 34


@pytest.mark.parametrize("radius", [2, 3, 5, 7])
def test_pair_offsets_cover_each_neighbour_pair_once(radius: int) -> None:
    offsets = pair_offsets(radius)
    assert len(set(offsets)) == len(offsets)
    neighbours = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                  if 0 < dy * dy + dx * dx < radius * radius}
    both_ways = set(offsets) | {(-dy, -dx) for dy, dx in offsets}
    assert both_ways == neighbours and len(both_ways) == 2 * len(offsets)


@pytest.mark.parametrize("radius,height,width", [(3, 4, 5), (5, 2, 3)])
def test_feature_affinities_match_loops(radius: int, height: int, width: int) -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, height, width, dtype=torch.float64, requires_grad=True)
    out = feature_affinities(features, radius)
    offsets = pair_offsets(radius)
    assert out.shape == (2, len(offsets), height, width)
    f = features.detach()
    for b in range(2):
        for k, (dy, dx) in enumerate(offsets):
            for y in range(height):
                for x in range(width):
                    if 0 <= y + dy < height and 0 <= x + dx < width:
                        expected = math.exp(-float((f[b, :, y, x] - f[b, :, y + dy, x + dx]).abs().mean()))
                    else:
                        expected = 0.0
                    assert out[b, k, y, x].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    out.sum().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0


def test_seed_labels_rule() -> None:
    label_low = np.array([[0, 1, 2], [0, 0, 3]], np.uint8)
    label_high = np.array([[0, 0, 2], [4, 0, 3]], np.uint8)
    # fg of low kept unless high says bg; low bg -> 255 unless high says bg -> 0.
    expected = np.array([[0, 0, 2], [255, 0, 3]], np.uint8)
    seeds = confident_seeds(label_low, label_high)
    assert seeds.dtype == np.uint8
    np.testing.assert_array_equal(seeds, expected)
    np.testing.assert_array_equal(label_low, [[0, 1, 2], [0, 0, 3]])  # input untouched


SEEDS = [[0, 0, 1, 255],
         [0, 1, 1, 2],
         [255, 2, 2, 2]]


def brute_force_labels(seeds: list[list[int]], radius: int) -> dict[str, set]:
    height, width = len(seeds), len(seeds[0])
    found: dict[str, set] = {"bg_pos": set(), "fg_pos": set(), "neg": set()}
    for k, (dy, dx) in enumerate(pair_offsets(radius)):
        for y in range(height):
            for x in range(width):
                if not (0 <= y + dy < height and 0 <= x + dx < width):
                    continue
                a, b = seeds[y][x], seeds[y + dy][x + dx]
                if a == 255 or b == 255:
                    continue
                if a != b:
                    found["neg"].add((k, y, x))
                elif a == 0:
                    found["bg_pos"].add((k, y, x))
                else:
                    found["fg_pos"].add((k, y, x))
    return found


def as_set(mask: torch.Tensor) -> set:
    return {tuple(int(v) for v in index) for index in torch.nonzero(mask)}


def test_affinity_labels_entry_by_entry() -> None:
    seeds = torch.tensor([SEEDS, [row[::-1] for row in SEEDS]], dtype=torch.int64)
    labels = affinity_labels(seeds, radius=2)
    assert isinstance(labels, AffinityLabels)
    for mask in labels:
        assert mask.dtype == torch.bool and mask.shape == (2, 4, 3, 4)
    for b in range(2):
        expected = brute_force_labels(seeds[b].tolist(), 2)
        for name in ("bg_pos", "fg_pos", "neg"):
            assert as_set(getattr(labels, name)[b]) == expected[name], (b, name)
    # A few pairs by hand (offsets (0,1), (1,-1), (1,0), (1,1) are k = 0..3).
    assert labels.bg_pos[0, 0, 0, 0]      # (0,0)=0 - (0,1)=0
    assert labels.neg[0, 0, 0, 1]         # (0,1)=0 - (0,2)=1
    assert labels.fg_pos[0, 0, 1, 1]      # (1,1)=1 - (1,2)=1
    assert labels.neg[0, 1, 1, 2]         # (1,2)=1 - (2,1)=2
    for mask in labels:
        assert not mask[0, 0, 0, 2]       # (0,2)=1 - (0,3)=255
        assert not mask[0, 0, 0, 3]       # partner outside the image
        assert not mask[0, 1, 1, 1]       # (1,1)=1 - (2,0)=255
        assert not mask[0, 1:, 2].any()   # last row: every partner one row down is outside


def test_affinity_labels_on_a_grid_smaller_than_the_radius() -> None:
    seeds = torch.tensor([[[0, 1, 255], [1, 1, 0]]], dtype=torch.int64)
    labels = affinity_labels(seeds, radius=5)
    expected = brute_force_labels(seeds[0].tolist(), 5)
    for name in ("bg_pos", "fg_pos", "neg"):
        assert as_set(getattr(labels, name)[0]) == expected[name], name


def test_affinity_loss_by_hand() -> None:
    shape = (1, 2, 1, 3)
    affinities = torch.tensor([[[[0.9, 0.5, 0.2]], [[0.7, 0.1, 0.4]]]], dtype=torch.float64,
                              requires_grad=True)
    bg = torch.zeros(shape, dtype=torch.bool)
    fg = torch.zeros(shape, dtype=torch.bool)
    neg = torch.zeros(shape, dtype=torch.bool)
    bg[0, 0, 0, 0] = bg[0, 1, 0, 0] = True   # 0.9, 0.7
    fg[0, 0, 0, 1] = True                    # 0.5
    neg[0, 0, 0, 2] = neg[0, 1, 0, 1] = True  # 0.2, 0.1
    loss, parts = affinity_loss(affinities, AffinityLabels(bg, fg, neg))
    eps = 1e-5
    bg_expected = -(math.log(0.9 + eps) + math.log(0.7 + eps)) / 2
    fg_expected = -math.log(0.5 + eps)
    neg_expected = -(math.log(1 - 0.2 + eps) + math.log(1 - 0.1 + eps)) / 2
    assert parts == pytest.approx({"bg_pos": bg_expected, "fg_pos": fg_expected, "neg": neg_expected})
    assert loss.item() == pytest.approx(bg_expected + fg_expected + 2 * neg_expected)
    loss.backward()
    # d/da of -log(a + eps) / n at the positive pairs, of -2 log(1 - a + eps) / n at the negatives.
    assert affinities.grad[0, 0, 0, 0].item() == pytest.approx(-1 / (0.9 + eps) / 2)
    assert affinities.grad[0, 0, 0, 2].item() == pytest.approx(2 / (1 - 0.2 + eps) / 2)
    assert affinities.grad[0, 1, 0, 2].item() == 0.0  # in no subset


def test_affinity_loss_empty_subsets_are_zero() -> None:
    torch.manual_seed(0)
    affinities = torch.rand(2, 4, 3, 4, requires_grad=True)
    seeds = torch.full((2, 3, 4), 255, dtype=torch.int64)
    seeds[:, 0, :2] = 1  # only foreground pairs
    loss, parts = affinity_loss(affinities, affinity_labels(seeds, 2))
    assert parts["bg_pos"] == 0.0 and parts["neg"] == 0.0 and parts["fg_pos"] > 0
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(affinities.grad).all()
    nothing = affinity_labels(torch.full((1, 3, 4), 255, dtype=torch.int64), 2)
    loss, parts = affinity_loss(torch.rand(1, 4, 3, 4), nothing)
    assert loss.item() == 0.0 and parts == {"bg_pos": 0.0, "fg_pos": 0.0, "neg": 0.0}


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        feature_affinities(torch.rand(3, 4, 5), 2)
    with pytest.raises(ValueError):
        affinity_labels(torch.zeros(4, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError):
        confident_seeds(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8))
    labels = affinity_labels(torch.zeros(1, 3, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError):
        affinity_loss(torch.rand(1, 12, 3, 4), labels)
