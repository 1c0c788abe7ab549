"""Segmentation (confusion matrix, IoU) and multi-label classification (AP) metrics."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from psa_ray.io.images import resize_label


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """pred, gt [...] int label maps of one shape -> [K, K + 1] int64 counts, K = num_classes:
    rows gt, columns pred 0..K-1, and last the predictions outside 0..K-1 (e.g. 255).

    Pixels whose gt is `ignore_index` are skipped. A prediction outside the classes is never
    right, and it is no other class's false positive: it counts against its gt class's recall
    only (`iou_per_class`).
    """
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64)
    if gt.size != pred.size:
        raise ValueError(f"pred has {pred.size} pixels but gt has {gt.size}")
    gt = gt.ravel()
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"gt values must be in 0..{num_classes - 1} or {ignore_index}, "
                         f"got {gt.min()}..{gt.max()}")
    pred = np.where((pred < 0) | (pred >= num_classes), num_classes, pred)
    counts = np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1).astype(np.int64)


def ground_truth_scores(gt: np.ndarray | None, shape: tuple[int, int], labels: Callable[[], dict[str, np.ndarray]],
                        num_classes: int, ignore_index: int = 255) -> tuple[dict[str, np.ndarray], str, str]:
    """Score labels against one image's ground truth gt [H,W] (None: there is none).

    shape: the image's (H, W); labels(): label maps by name, at any size (resized, nearest, to
    the image's). Returns (confusion matrices [K*(K+1)] by name, note, why): with a note
    (`missing`, `wrong_size`, `bad_values`: a value above the classes, `failed`: scoring raised)
    the image is not scored, and the matrices are empty. Never raises.
    """
    if gt is None:
        return {}, "missing", "no ground truth"
    if gt.shape != shape:
        return {}, "wrong_size", f"ground truth is {gt.shape[1]}x{gt.shape[0]}, the image {shape[1]}x{shape[0]}"
    if gt[gt != ignore_index].max(initial=0) >= num_classes:
        return {}, "bad_values", f"ground truth holds values above the {num_classes - 1} classes"
    try:
        return {name: confusion_matrix(resize_label(pred, *shape), gt, num_classes, ignore_index).ravel()
                for name, pred in labels().items()}, "", ""
    except Exception as e:  # a ground-truth problem never costs the label
        return {}, "failed", f"scoring: {type(e).__name__}: {e}"


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """Confusion matrix [n,n] (or [n,n+1] with `confusion_matrix`'s column of predictions outside
    the classes) -> IoU [n] float: TP / (TP + FP + FN), NaN for classes absent from both gt and
    pred."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    true_positive = np.diag(cm[:, :n])
    union = cm[:, :n].sum(axis=0) + cm.sum(axis=1) - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in gt or pred (NaN when there are none)."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """scores [N,C], targets [N,C] (0/1) -> non-interpolated AP per class [C] (NaN without positives).

    AP is the mean, over the positives, of the precision at the positive's score: among samples
    scoring >= it, the fraction that are positive (so tied scores count as one threshold).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets) > 0
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must be [N,C] of one shape, got {scores.shape} "
                         f"and {targets.shape}")
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        positive_scores = np.sort(scores[targets[:, c], c])
        if positive_scores.size == 0:
            continue
        all_scores = np.sort(scores[:, c])
        at_or_above = all_scores.size - np.searchsorted(all_scores, positive_scores, side="left")
        positives_at_or_above = positive_scores.size - np.searchsorted(positive_scores, positive_scores,
                                                                        side="left")
        ap[c] = np.mean(positives_at_or_above / at_or_above)
    return ap
