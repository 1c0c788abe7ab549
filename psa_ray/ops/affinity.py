"""AffinityNet's pair set, feature affinities, affinity labels from seeds, and the affinity loss.

A pair is a pixel i = (y, x) on the stride-8 feature grid and its partner j = (y + dy, x + dx)
for one offset (dy, dx) of `pair_offsets(radius)`: one half-plane of the disc of Euclidean
radius < `radius`, so every unordered pair of nearby pixels appears exactly once. Per-pair
tensors are laid out [B, K, h, w]: entry [b, k, y, x] is the pair of (y, x) with its k-th partner.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from psa_ray.io.palette import IGNORE

EPS = 1e-5


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) of the half-plane pair set: dy*dy + dx*dx < radius**2, (dy, dx) > (0, 0).

    (0, dx) for dx in 1..radius-1 first, then dy in 1..radius-1 row by row with dx in
    -(radius-1)..radius-1, as in the reference. radius 5 -> 34 offsets.
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dy * dy + dx * dx < radius * radius:
                offsets.append((dy, dx))
    return offsets


def _overlap(shift: int, size: int) -> tuple[slice, slice]:
    """Along one axis of length size: the slice of positions p with p + shift inside, and of p + shift."""
    length = max(0, size - abs(shift))
    first = max(0, -shift) if length else 0
    second = max(0, shift) if length else 0
    return slice(first, first + length), slice(second, second + length)


def pair_slices(dy: int, dx: int, height: int, width: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices (of i, of j) over the last two dims selecting the pairs whose partner is inside the image.

    `x[..., *first]` and `x[..., *second]` line up: element-wise they are pixel i and its partner
    i + (dy, dx), for every i whose partner lies in the height x width grid (none if |dy| >= height).
    """
    rows_i, rows_j = _overlap(dy, height)
    cols_i, cols_j = _overlap(dx, width)
    return (rows_i, cols_i), (rows_j, cols_j)


def feature_affinities(features: Tensor, radius: int) -> Tensor:
    """features [B,D,h,w] -> affinities [B,K,h,w]: exp(-mean_d |f_i - f_j|), 0 where j is outside.

    Differentiable; runs on the features' device and dtype.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B,D,h,w], got shape {tuple(features.shape)}")
    height, width = features.shape[-2:]
    per_offset = []
    for dy, dx in pair_offsets(radius):
        (rows_i, cols_i), (rows_j, cols_j) = pair_slices(dy, dx, height, width)
        distance = (features[:, :, rows_i, cols_i] - features[:, :, rows_j, cols_j]).abs().mean(dim=1)
        outside = (cols_i.start, width - cols_i.stop, rows_i.start, height - rows_i.stop)
        per_offset.append(F.pad(torch.exp(-distance), outside))
    return torch.stack(per_offset, dim=1)


def confident_seeds(label_low: np.ndarray, label_high: np.ndarray) -> np.ndarray:
    """Confident seeds [H,W] uint8 from the CRF label maps at alpha_low and alpha_high ([H,W] uint8).

    Foreground of `label_low` (background weak) is kept, background of `label_high` (background
    strong) becomes 0, everything else 255 (don't care), as in the reference.
    """
    label_low = np.asarray(label_low)
    label_high = np.asarray(label_high)
    if label_low.shape != label_high.shape or label_low.ndim != 2:
        raise ValueError(f"label maps must be two [H,W] arrays of one shape, got "
                         f"{label_low.shape} and {label_high.shape}")
    seeds = label_low.astype(np.uint8)
    seeds[label_low == 0] = IGNORE
    seeds[label_high == 0] = 0
    return seeds


def cell_seed_labels(scores: Tensor, stride: int = 8) -> Tensor:
    """psa's AffinityNet labels from stage-B CRF scores, after the crop.

    scores [2,n+1,H,W] (the alpha_low and alpha_high maps, background first; zero where the crop
    padded the image) -> seeds [ceil(H/stride), ceil(W/stride)] int64 on the feature grid. Each
    map is average-pooled over the stride x stride cells (zero-padded at the bottom and right,
    as skimage's block_reduce), then per cell: the argmax of the low maps, 255 where it is the
    background; 0 where the argmax of the high maps is the background; 255 where every score is
    zero (crop padding). Label values are channel indices (1..n), which is all the pair labels
    need: they compare labels for equality only.
    """
    if scores.dim() != 4 or scores.shape[0] != 2:
        raise ValueError(f"scores must be [2,n+1,H,W], got shape {tuple(scores.shape)}")
    height, width = scores.shape[-2:]
    padded = F.pad(scores.float(), (0, -width % stride, 0, -height % stride))
    pooled = F.avg_pool2d(padded, stride, stride)
    low, high = pooled[0].argmax(dim=0), pooled[1].argmax(dim=0)
    seeds = torch.where(low == 0, torch.full_like(low, IGNORE), low)
    seeds[high == 0] = 0
    seeds[pooled.amax(dim=(0, 1)) <= 0] = IGNORE
    return seeds


class AffinityLabels(NamedTuple):
    """Which pairs [B,K,h,w] (bool) are positive background, positive foreground, or negative."""

    bg_pos: Tensor
    fg_pos: Tensor
    neg: Tensor


def affinity_labels(seeds: Tensor, radius: int) -> AffinityLabels:
    """seeds [B,h,w] int (0 bg, 1..C classes, 255 ignore) on the feature grid -> pair labels [B,K,h,w].

    A pair with an ignored pixel, or whose partner lies outside the image, is in no subset.
    """
    if seeds.dim() != 3:
        raise ValueError(f"seeds must be [B,h,w], got shape {tuple(seeds.shape)}")
    batch, height, width = seeds.shape
    shape = (batch, len(pair_offsets(radius)), height, width)
    bg_pos, fg_pos, neg = (torch.zeros(shape, dtype=torch.bool, device=seeds.device) for _ in range(3))
    for k, (dy, dx) in enumerate(pair_offsets(radius)):
        (rows_i, cols_i), (rows_j, cols_j) = pair_slices(dy, dx, height, width)
        first, second = seeds[:, rows_i, cols_i], seeds[:, rows_j, cols_j]
        valid = (first != IGNORE) & (second != IGNORE)
        same = valid & (first == second)
        bg_pos[:, k, rows_i, cols_i] = same & (first == 0)
        fg_pos[:, k, rows_i, cols_i] = same & (first != 0)
        neg[:, k, rows_i, cols_i] = valid & (first != second)
    return AffinityLabels(bg_pos=bg_pos, fg_pos=fg_pos, neg=neg)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values over mask; 0 (keeping the graph) when the mask is empty."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def affinity_loss(affinities: Tensor, labels: AffinityLabels) -> tuple[Tensor, dict[str, float]]:
    """L = L_bg+ + L_fg+ + 2 L- over affinities [B,K,h,w] -> (scalar loss, float parts per subset)."""
    if not (affinities.shape == labels.bg_pos.shape == labels.fg_pos.shape == labels.neg.shape):
        raise ValueError(f"affinities {tuple(affinities.shape)} and labels "
                         f"{tuple(labels.bg_pos.shape)} must have one shape [B,K,h,w]")
    positive = -torch.log(affinities + EPS)
    negative = -torch.log(1.0 - affinities + EPS)
    parts = {
        "bg_pos": _masked_mean(positive, labels.bg_pos),
        "fg_pos": _masked_mean(positive, labels.fg_pos),
        "neg": _masked_mean(negative, labels.neg),
    }
    loss = parts["bg_pos"] + parts["fg_pos"] + 2.0 * parts["neg"]
    return loss, {name: float(value.detach()) for name, value in parts.items()}
