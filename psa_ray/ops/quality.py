"""A per-image quality score of a pseudo label, without ground truth: how much of it to trust.

Three figures, each in [0, 1], and the score is the lowest of them:
- **interior**: the mean, over the label's values (background included), of the share of the
  value's pixels farther than `band` pixels from a pixel of another value. The walk resolves
  labels on AffinityNet's stride-8 grid, so a label's errors sit within about a cell of its
  edges: a label of small or thin regions is mostly edge, and least certain.
- **agreement**: the mean IoU, over the values in either, between the walk's argmax and the final
  label (after the CRF): where the CRF had to move much of a region, the walk was unsure of it.
- **tags kept**: the share of the image's tagged classes that have pixels in the label (a tagged
  class with none is a sure error).
On the built-in corpus the score's Spearman correlation with the image's true mIoU is in
bench/README.md ("Per-image quality score").
"""
from __future__ import annotations

import numpy as np


def _window_extreme(label: np.ndarray, band: int, reduce: np.ufunc) -> np.ndarray:
    """The max or min (`reduce` np.maximum / np.minimum) of label [H,W] over each pixel's
    (2 band + 1)^2 window, the image's edge pixels repeated beyond it."""
    out = label
    for axis in (0, 1):
        padded = np.pad(out, [(band, band) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        size = out.shape[axis]
        result = padded.take(range(0, size), axis=axis)
        for shift in range(1, 2 * band + 1):
            result = reduce(result, padded.take(range(shift, shift + size), axis=axis))
        out = result
    return out


def interior_share(label: np.ndarray, band: int) -> float:
    """label [H,W] int -> mean over its values of the share of each value's pixels with no other
    value within `band` pixels (Chebyshev distance; the image border is not an edge)."""
    label = np.asarray(label)
    if band <= 0:
        return 1.0
    interior = _window_extreme(label, band, np.maximum) == _window_extreme(label, band, np.minimum)
    values, inverse = np.unique(label.ravel(), return_inverse=True)
    inside = np.bincount(inverse, weights=interior.ravel(), minlength=len(values))
    total = np.bincount(inverse, minlength=len(values))
    return float(np.mean(inside / total))


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Two label maps [H,W] of one shape -> mean IoU over the values present in either."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label maps of {a.size} and {b.size} pixels")
    values = np.union1d(a, b)
    return float(np.mean([np.sum((a == v) & (b == v)) / np.sum((a == v) | (b == v)) for v in values]))


def label_quality(final: np.ndarray, walk_label: np.ndarray, band: int, class_ids: np.ndarray) -> float:
    """The per-image quality score in [0, 1]: min(interior share of the final label [H,W] at
    `band` pixels, its agreement with the walk's argmax label [H,W], the share of the tagged
    class_ids [n] present in it)."""
    kept = float(np.isin(class_ids, final).mean()) if len(class_ids) else 1.0
    return min(interior_share(final, band), label_agreement(walk_label, final), kept)


def edge_band(height: int, walk_height: int, stride: int = 8) -> int:
    """Half a feature cell in image pixels (at least 1): a stride-8 cell of an image walked at
    walk_height rows (`forward.upscaled_size`) spans stride * height / walk_height pixels."""
    return max(1, round(stride * height / walk_height / 2))
