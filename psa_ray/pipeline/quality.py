"""Label quality without ground truth: statistics of a run's committed labels, and warnings.

Summed from `shards/` (tags, class_fractions, mean_confidence) in Ray read tasks, so neither the
driver's memory nor its I/O grows with the corpus. A class "vanishes" from an image when the image is tagged with it
but its final label has no pixel of it: the CAM network did not find it, or the walk washed it
out. A class that vanishes from many of its images, or covers much less of its images than the
other classes cover of theirs, was likely learned poorly.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from psa_ray.io.storage import join
from psa_ray.pipeline.corpus import READ_CPUS, parquet_dataset

CONFIDENCE_BINS = 100         # histogram of per-image mean confidence over [0, 1]
# A class (tagged in at least MIN_TAGGED images) is flagged when it vanishes from more than
# VANISHED_WARNING of them, or covers less than AREA_WARNING x the median class's area share.
# Measured on the built-in corpus (bench/README.md, "Label statistics"): in two good default runs
# no class vanished from more than 4.5% of its images and the smallest area ratio of a class with
# final IoU >= 58 was 0.58; the poorly learned classes (final IoU 0-27) vanished from 21-84% or had
# area ratios 0.06-0.39.
VANISHED_WARNING = 0.15
AREA_WARNING = 0.5
MIN_TAGGED = 10


def _block_sums(batch: pa.Table, *, class_names: list[str]) -> pa.Table:
    """The sums of a block of shard rows (tags, class_fractions, mean_confidence) as one row: images,
    per class [C] tagged, vanished, untagged_with_pixels and area share, background share, and
    the confidence histogram [CONFIDENCE_BINS]."""
    k, index = len(class_names), {name: i for i, name in enumerate(class_names)}
    fractions = np.asarray(batch.column("class_fractions").combine_chunks().flatten(), np.float64)
    fractions = fractions.reshape(batch.num_rows, k + 1)
    is_tagged = np.zeros((batch.num_rows, k), bool)
    for row, tags in enumerate(batch.column("tags").to_pylist()):
        is_tagged[row, [index[t] for t in tags if t in index]] = True
    present = fractions[:, 1:] > 0
    confidence = np.asarray(batch.column("mean_confidence"), np.float64)
    sums = {"images": [batch.num_rows], "tagged": [is_tagged.sum(axis=0).tolist()],
            "vanished": [(is_tagged & ~present).sum(axis=0).tolist()],
            "untagged_with_pixels": [(~is_tagged & present).sum(axis=0).tolist()],
            "share": [np.where(is_tagged, fractions[:, 1:], 0.0).sum(axis=0).tolist()],
            "background": [float(fractions[:, 0].sum())],
            "histogram": [np.histogram(confidence, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0].tolist()]}
    return pa.table(sums)


def label_statistics(output: str, class_names: list[str]) -> dict[str, Any] | None:
    """Per-class and per-image statistics of the labels committed under `output` (None: none yet).

    classes[name]: tagged_images, area_share (mean share of a tagged image's pixels that are the
    class), vanished (share of its tagged images whose label has none of it) and
    untagged_with_pixels (images not tagged with it whose label has some: 0 by construction, the
    labels only hold tagged classes). confidence: per-image mean confidence, as a histogram over
    [0, 1] and its quantiles. The shards are read and summed in Ray tasks, a file per task; the
    driver adds up one row of sums per file.
    """
    ds = parquet_dataset(join(output, "shards"), ["tags", "class_fractions", "mean_confidence"])
    if ds is None:
        return None
    total = {name: np.zeros(len(class_names)) for name in ("tagged", "vanished", "untagged_with_pixels", "share")}
    images, background, histogram = 0, 0.0, np.zeros(CONFIDENCE_BINS, np.int64)
    sums = ds.map_batches(_block_sums, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
                          fn_kwargs={"class_names": class_names})
    for row in sums.iter_rows():
        images += row["images"]
        background += row["background"]
        histogram += np.asarray(row["histogram"], np.int64)
        for name, values in total.items():
            values += np.asarray(row[name], np.float64)
    if not images:
        return None
    tagged = total["tagged"]
    with np.errstate(invalid="ignore", divide="ignore"):
        area, gone = total["share"] / tagged, total["vanished"] / tagged
    classes = {name: {"tagged_images": int(tagged[i]),
                      "area_share": None if not tagged[i] else round(float(area[i]), 4),
                      "vanished": None if not tagged[i] else round(float(gone[i]), 4),
                      "untagged_with_pixels": int(total["untagged_with_pixels"][i])}
               for i, name in enumerate(class_names)}
    return {"images": images, "background_share": round(background / images, 4), "classes": classes,
            "confidence": {"histogram": histogram.tolist(), "bins": CONFIDENCE_BINS,
                           "quantiles": _quantiles(histogram)}}


def _quantiles(histogram: np.ndarray) -> dict[str, float]:
    """p10/p50/p90 of a histogram over [0, 1] (each at its bin's upper edge)."""
    cumulative = np.cumsum(histogram) / max(1, histogram.sum())
    edges = np.linspace(0.0, 1.0, len(histogram) + 1)[1:]
    return {f"p{q}": round(float(edges[np.searchsorted(cumulative, q / 100)]), 3) for q in (10, 50, 90)}


def quality_warnings(statistics: dict[str, Any] | None) -> list[str]:
    """One line per class that looks learned poorly (VANISHED_WARNING, AREA_WARNING), naming it."""
    if not statistics:
        return []
    judged = {n: c for n, c in statistics["classes"].items() if c["tagged_images"] >= MIN_TAGGED}
    median_area = float(np.median([c["area_share"] for c in judged.values()])) if judged else 0.0
    warnings = []
    for name, c in judged.items():
        if c["vanished"] > VANISHED_WARNING:
            why = (f"has no pixels in the labels of {100 * c['vanished']:.0f}% of the {c['tagged_images']} "
                   "images tagged with it")
        elif c["area_share"] < AREA_WARNING * median_area:
            why = (f"covers {100 * c['area_share']:.1f}% of the {c['tagged_images']} images tagged with it, "
                   f"against a median of {100 * median_area:.1f}% for the classes (unless its objects are small)")
        else:
            continue
        warnings.append(f"class {name!r} {why}: its networks likely learned it poorly "
                        "(check report/; more epochs or more images of it may help)")
    return warnings


def statistics_table(statistics: dict[str, Any]) -> str:
    """The per-class statistics as aligned text (percent)."""
    names = list(statistics["classes"])
    width = max(len(n) for n in [*names, "class"]) + 2
    lines = [f"{'class':<{width}}{'images':>8}{'area %':>9}{'vanished %':>12}"]
    for name in names:
        c = statistics["classes"][name]
        area = "n/a" if c["area_share"] is None else f"{100 * c['area_share']:.1f}"
        gone = "n/a" if c["vanished"] is None else f"{100 * c['vanished']:.1f}"
        lines.append(f"{name:<{width}}{c['tagged_images']:>8}{area:>9}{gone:>12}")
    q = statistics["confidence"]["quantiles"]
    lines.append(f"per-image mean confidence: p10 {q['p10']:.2f}, median {q['p50']:.2f}, p90 {q['p90']:.2f}")
    return "\n".join(lines)
