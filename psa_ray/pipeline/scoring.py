"""Scoring labels against ground truth: a folder of label PNGs against a folder of ground-truth
PNGs (both `<image_id>.png`, `score_folders`), and a labeling run's eval/ files (`evaluation`).

Local folders or s3:// prefixes; files are matched by id, and the ids found on one side only are
reported, not scored. Counting follows `psa_ray.ops.metrics.confusion_matrix`: ground truth 255
is ignored, and a predicted value outside 0..K-1 (e.g. 255) is wrong for its pixel, a miss of its
ground-truth class and no other class's false positive.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from psa_ray.errors import UserError
from psa_ray.io.palette import IGNORE, decode_label_png
from psa_ray.io.storage import list_files, read_bytes
from psa_ray.ops.metrics import confusion_matrix, iou_per_class, mean_iou
from psa_ray.pipeline.tables import Table, text_table
from psa_ray.pipeline.writers import EVAL_VARIANTS, read_table
from psa_ray.pipeline.layout import OutputLayout

VALUES = 256          # label PNGs are 8-bit: values 0..255
CHUNK = 64            # images read at a time (bounds memory on large folders)
READ_THREADS = 16


class ScoringError(UserError):
    """The folders cannot be scored (nothing to match, unreadable or mismatched files)."""


def label_ids(folder: str) -> dict[str, str]:
    """{image_id: URI} of the `.png` files under a folder/prefix (id: path below it, no suffix)."""
    prefix = folder.rstrip("/") + "/"
    return {uri[len(prefix):-len(".png")]: uri for uri in list_files(folder, suffix=".png")}


def _pair_counts(image_id: str, label_uri: str, gt_uri: str) -> np.ndarray:
    """[256,256] pixel counts of (gt value, label value), gt 255 left out."""
    try:
        label = decode_label_png(read_bytes(label_uri))
        gt = decode_label_png(read_bytes(gt_uri))
    except (OSError, ValueError) as e:
        raise ScoringError(f"{image_id}: {type(e).__name__}: {e}") from e
    if label.shape != gt.shape:
        raise ScoringError(f"{image_id}: label {label_uri} is {label.shape[1]}x{label.shape[0]} but "
                           f"ground truth {gt_uri} is {gt.shape[1]}x{gt.shape[0]}")
    return confusion_matrix(label, gt, VALUES, ignore_index=IGNORE)[:, :VALUES]  # 8-bit: none outside


def _fold(counts: np.ndarray, num_classes: int) -> np.ndarray:
    """[256,256] (gt, label) counts -> the [K,K+1] confusion matrix of `confusion_matrix(.., K)`:
    the label values >= K in its last column."""
    k = num_classes
    return np.concatenate([counts[:k, :k], counts[:k, k:].sum(axis=1, keepdims=True)], axis=1)


def score_folders(labels: str, gt: str, num_classes: int | None = None) -> dict[str, Any]:
    """IoU of the labels in `labels` against the ground truth in `gt`, over the ids in both.

    num_classes K counts background (VOC: 21); None infers it as 1 + the largest value other
    than 255 in either folder. Returns the shape of a metrics.json entry plus the matching:
    `{"miou", "iou": [K floats, None for classes absent from both], "num_classes", "images",
    "labels_without_gt": [ids], "gt_without_labels": [ids]}`.
    Raises ScoringError when no id is in both folders, a file is unreadable, a label and its
    ground truth differ in size, or the ground truth holds a value >= num_classes (other than 255).
    """
    label_files, gt_files = label_ids(labels), label_ids(gt)
    if not label_files:
        raise ScoringError(f"no label PNGs under {labels}")
    if not gt_files:
        raise ScoringError(f"no ground-truth PNGs under {gt}")
    common = sorted(label_files.keys() & gt_files.keys())
    if not common:
        raise ScoringError(f"none of the {len(label_files)} labels under {labels} has a ground truth "
                           f"of the same name under {gt} ({len(gt_files)} files), e.g. "
                           f"{min(label_files)}.png vs {min(gt_files)}.png")
    counts = np.zeros((VALUES, VALUES), np.int64)
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for start in range(0, len(common), CHUNK):
            ids = common[start:start + CHUNK]
            for pairs in pool.map(lambda i: _pair_counts(i, label_files[i], gt_files[i]), ids):
                counts += pairs
    gt_values = np.flatnonzero(counts.sum(axis=1))
    label_values = np.flatnonzero(counts.sum(axis=0))
    if num_classes is None:
        seen = [v for v in (*gt_values, *label_values) if v != IGNORE]
        num_classes = max(seen, default=0) + 1
    too_big = gt_values[gt_values >= num_classes]
    if too_big.size:
        raise ScoringError(f"ground truth under {gt} holds value(s) {too_big.tolist()}, but there are "
                           f"only {num_classes} classes (0..{num_classes - 1}, 255 ignored): pass the "
                           "right classes")
    cm = _fold(counts, num_classes)
    iou = iou_per_class(cm)
    return {"miou": mean_iou(cm),
            "iou": [None if np.isnan(v) else float(v) for v in iou],
            "num_classes": int(num_classes), "images": len(common),
            "labels_without_gt": sorted(label_files.keys() - gt_files.keys()),
            "gt_without_labels": sorted(gt_files.keys() - label_files.keys())}


def iou_rows(class_names: list[str], columns: dict[str, dict[str, Any]]) -> Table:
    """Per-class IoU (percent) and mIoU, one column per entry of `columns` ({title: {"iou": [K
    floats or None], "miou": float}}: `score_folders` results or the variants of a metrics.json);
    class_names: the K names, background first."""
    rows = [[name, *("n/a" if c["iou"][i] is None else f"{100 * c['iou'][i]:.1f}" for c in columns.values())]
            for i, name in enumerate(class_names)]
    rows.append(["mIoU", *(f"{100 * c['miou']:.1f}" for c in columns.values())])
    return ["class", *columns], rows


def iou_table(class_names: list[str], columns: dict[str, dict[str, Any]]) -> str:
    """`iou_rows` as aligned text."""
    return text_table(iou_rows(class_names, columns))


def evaluation(output: str, class_names: list[str]) -> dict[str, Any] | None:
    """metrics.json content from a labeling run's eval/: the confusion matrices summed over the
    eval files whose shard is committed (an eval file without its shard belongs to an
    interrupted write), and in `ground_truth_notes` how many labeled images were not scored, by
    reason (`actors.RefineActor.scores`); None when no image was scored."""
    shards = {u.rsplit("/", 1)[-1] for u in list_files(OutputLayout(output).shards, suffix=".parquet")}
    k = len(class_names) + 1
    sums: dict[str, np.ndarray | None] = {v: np.zeros((k, k + 1), np.int64) for v in EVAL_VARIANTS}
    images, notes = 0, Counter[str]()
    for uri in list_files(OutputLayout(output).eval, suffix=".parquet"):
        if uri.rsplit("/", 1)[-1] not in shards:
            continue
        row = read_table(uri).to_pylist()[0]
        images += row["images"]
        notes.update(note["code"] for note in row.get("notes") or [])
        if not row["images"]:
            continue
        for v in EVAL_VARIANTS:
            matrix = sums[v]
            if row.get(f"cm_{v}") is None:
                sums[v] = None  # written before the variant existed: not scored
            elif matrix is not None:  # [k,k] in files written before the column of values outside
                counts = np.asarray(row[f"cm_{v}"], np.int64).reshape(k, -1)
                matrix[:, :counts.shape[1]] += counts
    if not images:
        return None
    metrics: dict[str, Any] = {"class_names": ["background", *class_names], "images": images,
                               "ground_truth_notes": dict(sorted(notes.items()))}
    for variant, matrix in sums.items():
        if matrix is None:
            continue  # eval files of an older run lack a newer variant (e.g. "psa")
        iou = iou_per_class(matrix)
        metrics[variant] = {"miou": float(np.nanmean(iou)),
                            "iou": [None if np.isnan(v) else float(v) for v in iou]}
    return metrics


def metrics_rows(metrics: dict[str, Any]) -> Table:
    """The per-class IoU table of a metrics.json (`evaluation`), one column per variant."""
    return iou_rows(metrics["class_names"], {v: metrics[v] for v in EVAL_VARIANTS if v in metrics})
