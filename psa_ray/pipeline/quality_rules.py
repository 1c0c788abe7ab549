"""Label quality without ground truth, the plain part (no Ray; `pipeline.quality` runs it over a
run's files): the statistics of a block of committed rows and of their sums, the thresholds of the
warnings, the statistics table, and the lowest quality scores of a block.

A class "vanishes" from an image when the image is tagged with it but its final label has no
pixel of it: the CAM network did not find it, or the walk washed it out. A class that vanishes
from many of its images, or covers much less (or much more) of its images than the other classes
cover of theirs, was likely learned poorly.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from psa_ray.pipeline.tables import Table

CONFIDENCE_BINS = 100         # histogram of per-image mean confidence over [0, 1]
# A class (tagged in at least MIN_TAGGED images) is flagged when it vanishes from more than
# VANISHED_WARNING of them, or covers less than AREA_WARNING x the median class's area share.
# Measured on the built-in corpus (bench/README.md, "Label statistics"): in two good default runs
# no class vanished from more than 4.5% of its images and the smallest area ratio of a class with
# final IoU >= 58 was 0.58; the poorly learned classes (final IoU 0-27) vanished from 21-84% or had
# area ratios 0.06-0.39.
VANISHED_WARNING = 0.15
AREA_WARNING = 0.5
# ... or covers more than AREA_HIGH_WARNING x the median: over 26 default-style runs (2026-12-03) the
# classes with the largest area ratio were at most 1.93x in good runs, and 3.0x, 3.0x and 7.5x
# where the CAM network had learned that class badly (final IoU 27, 35 and 17: it took in the
# background or another class); a 1-epoch run's 2.03x class had IoU 88.
AREA_HIGH_WARNING = 2.5
MIN_TAGGED = 10


# --------------------------------------------------------------------------- the statistics

def block_sums(batch: pa.Table, *, column: str, class_names: list[str]) -> pa.Table:
    """The sums of a block of rows (tags, `column`: fractions [background, C classes(, ignore)])
    as one row: images; per class [C] tagged, empty (tagged, no pixel of it, or restored from the CAM
    after the walk erased it: column `restored`), untagged_with_pixels,
    share, and background and ignore shares of its tagged images; background and ignore shares;
    with `mean_confidence`, its histogram [CONFIDENCE_BINS]. A block without `column` (a file
    written before it existed) counts nothing."""
    k, index = len(class_names), {name: i for i, name in enumerate(class_names)}
    n = batch.num_rows if column in batch.column_names else 0
    fractions = np.zeros((n, k + 2))
    is_tagged = np.zeros((n, k), bool)
    erased = np.zeros((n, k), bool)   # the walk left no pixel; the label kept the CAM's region
    if n:
        values = np.asarray(batch.column(column).combine_chunks().flatten(), np.float64).reshape(n, -1)
        fractions[:, : values.shape[1]] = values
        tags = batch.column("tags").to_pylist()
        for row, names in enumerate(tags):
            is_tagged[row, [index[t] for t in names if t in index]] = True
        if "restored" in batch.column_names:
            for row, values in enumerate(batch.column("restored").to_pylist()):
                erased[row, [v - 1 for v in values or [] if 0 < v <= k]] = True
    classes, background, ignore = fractions[:, 1: k + 1], fractions[:, 0], fractions[:, k + 1]
    present = classes > 0
    sums = {"images": [n], "tagged": is_tagged.sum(axis=0).tolist(),
            "empty": (is_tagged & (~present | erased)).sum(axis=0).tolist(),
            "untagged_with_pixels": (~is_tagged & present).sum(axis=0).tolist(),
            "share": np.where(is_tagged, classes, 0.0).sum(axis=0).tolist(),
            "tagged_background": (is_tagged * background[:, None]).sum(axis=0).tolist(),
            "tagged_ignore": (is_tagged * ignore[:, None]).sum(axis=0).tolist(),
            "background": [float(background.sum())], "ignore": [float(ignore.sum())]}
    sums = {name: [value] if name not in ("images", "background", "ignore") else value
            for name, value in sums.items()}
    if "mean_confidence" in batch.column_names:
        confidence = np.asarray(batch.column("mean_confidence"), np.float64)[:n]
        sums["histogram"] = [np.histogram(confidence, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0].tolist()]
    return pa.table(sums)


def _per_class(total: dict[str, Any], class_names: list[str],
               fields: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{class: {"tagged_images", field: mean over its tagged images of total[sum name]}}, for
    fields {field: sum name}; None where a class is tagged in no image."""
    tagged = total["tagged"]
    out = {}
    for i, name in enumerate(class_names):
        entry: dict[str, Any] = {"tagged_images": int(tagged[i])}
        for field, key in fields.items():
            entry[field] = round(float(total[key][i] / tagged[i]), 4) if tagged[i] else None
        out[name] = entry
    return out


def summarize_labels(total: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """Per-class and per-image statistics of labels from their summed `block_sums` (column
    class_fractions).

    classes[name]: tagged_images, area_share (mean share of a tagged image's pixels that are the
    class), vanished (share of its tagged images whose label has none of it) and
    untagged_with_pixels (images not tagged with it whose label has some: 0 by construction, the
    labels only hold tagged classes). confidence: per-image mean confidence, as a histogram over
    [0, 1] and its quantiles.
    """
    classes = _per_class(total, class_names, {"area_share": "share", "vanished": "empty"})
    for i, name in enumerate(class_names):
        classes[name]["untagged_with_pixels"] = int(total["untagged_with_pixels"][i])
    images = int(total["images"])
    histogram = total["histogram"].astype(np.int64)
    return {"images": images, "background_share": round(float(total["background"]) / images, 4),
            "classes": classes, "confidence": {"histogram": histogram.tolist(), "bins": CONFIDENCE_BINS,
                                               "quantiles": _quantiles(histogram)}}


def summarize_seeds(total: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """Statistics of stage B's confident seeds from their summed `block_sums` (column
    seed_fractions).

    Over all seeded images: background_share and ignore_share (pixels confidently background, and
    left out of AffinityNet's labels). classes[name]: tagged_images, foreground_share (mean share
    of a tagged image's pixels confidently the class), no_seed (share of its tagged images with no
    confident pixel of it: the CAM network did not find it confidently there), and the
    background_share and ignore_share of its images.
    """
    images = int(total["images"])
    return {"images": images, "background_share": round(float(total["background"]) / images, 4),
            "ignore_share": round(float(total["ignore"]) / images, 4),
            "classes": _per_class(total, class_names, {
                "foreground_share": "share", "no_seed": "empty", "background_share": "tagged_background",
                "ignore_share": "tagged_ignore"})}


def _quantiles(histogram: np.ndarray) -> dict[str, float]:
    """p10/p50/p90 of a histogram over [0, 1] (each at its bin's upper edge)."""
    cumulative = np.cumsum(histogram) / max(1, histogram.sum())
    edges = np.linspace(0.0, 1.0, len(histogram) + 1)[1:]
    return {f"p{q}": round(float(edges[np.searchsorted(cumulative, q / 100)]), 3) for q in (10, 50, 90)}


# --------------------------------------------------------------------------- the warnings and the table

def quality_warnings(statistics: dict[str, Any] | None, seeds: dict[str, Any] | None = None) -> list[str]:
    """One line per class that looks learned poorly (VANISHED_WARNING, AREA_WARNING,
    AREA_HIGH_WARNING), naming it.
    With the seed statistics, a class that vanished from images where it had confident seeds is
    said to be lost by the random walk rather than missed by the CAM network."""
    if not statistics:
        return []
    judged = {n: c for n, c in statistics["classes"].items() if c["tagged_images"] >= MIN_TAGGED}
    median_area = float(np.median([c["area_share"] for c in judged.values()])) if judged else 0.0
    warnings = []
    for name, c in judged.items():
        if c["vanished"] > VANISHED_WARNING:
            why = (f"vanished from {100 * c['vanished']:.0f}% of the {c['tagged_images']} images tagged with it "
                   "(no pixels, or only its confident CAM region restored after the walk erased it)")
            no_seed = seeds["classes"][name]["no_seed"] if seeds and name in seeds["classes"] else None
            if no_seed is not None and no_seed < c["vanished"] / 2:
                warnings.append(f"class {name!r} {why}, though only {100 * no_seed:.0f}% of them have no confident "
                                "seed of it: the random walk lost it there (check report/; see the README, "
                                "'Known limits')")
                continue
        elif not AREA_WARNING * median_area <= c["area_share"] <= AREA_HIGH_WARNING * median_area:
            small = c["area_share"] < median_area
            why = (f"covers {100 * c['area_share']:.1f}% of the {c['tagged_images']} images tagged with it, "
                   f"against a median of {100 * median_area:.1f}% for the classes (unless its objects are "
                   + ("small)" if small else "large): it likely took in the background or other classes"))
        else:
            continue
        warnings.append(f"class {name!r} {why}: its networks likely learned it poorly "
                        "(check report/; more epochs or more images of it may help)")
    return warnings


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def statistics_rows(labels: dict[str, Any], seeds: dict[str, Any] | None = None,
                    held_out: dict[str, Any] | None = None) -> Table:
    """One row per class (percent): images tagged with it; with `held_out` (`classifier_ap`), the
    CAM network's held-out tag AP; with `seeds` (`seed_statistics`), its confident seed share and
    the share of its images without a seed of it; its label area share and vanished share."""
    header = ["class", "images"] + (["tag AP %"] if held_out else []) \
        + (["seed %", "no seed %"] if seeds else []) + ["area %", "vanished %"]
    rows = []
    for name, c in labels["classes"].items():
        cells = [name, str(c["tagged_images"])]
        if held_out:
            cells.append(_percent(held_out["ap"].get(name)))
        if seeds:
            s = seeds["classes"][name]
            cells += [_percent(s["foreground_share"]), _percent(s["no_seed"])]
        rows.append(cells + [_percent(c["area_share"]), _percent(c["vanished"])])
    if held_out and held_out.get("map") is not None:
        rows.append(["mean (held out)", str(held_out["images"]), _percent(held_out["map"])] + [""] * (len(header) - 3))
    return header, rows


def statistics_notes(labels: dict[str, Any], seeds: dict[str, Any] | None = None,
                     held_out: dict[str, Any] | None = None) -> list[str]:
    """The run-wide figures under the table: held-out images, seed and label background shares,
    the per-image confidence quantiles."""
    q = labels["confidence"]["quantiles"]
    notes = []
    if held_out:
        notes.append(f"tag AP: the CAM network on {held_out['images']} images of the training sample it did "
                     "not train on")
    if seeds:
        notes.append(f"seeds ({seeds['images']} images): {_percent(seeds['background_share'])}% confident "
                     f"background, {_percent(seeds['ignore_share'])}% ignored")
    notes.append(f"labels: {_percent(labels['background_share'])}% background; per-image mean confidence "
                 f"p10 {q['p10']:.2f}, median {q['p50']:.2f}, p90 {q['p90']:.2f}")
    return notes


# --------------------------------------------------------------------------- the review list

QUALITY_COLUMN = "quality"  # shards/: the per-image quality score (`ops.quality.label_quality`)


def lowest(batch: pa.Table, *, count: int) -> pa.Table:
    """The `count` rows of a block of lowest quality score (a block without the column: none)."""
    if QUALITY_COLUMN not in batch.column_names or batch.num_rows == 0:
        return pa.table({"image_id": pa.array([], pa.string()), "image": pa.array([], pa.string()),
                         "tags": pa.array([], pa.list_(pa.string())), QUALITY_COLUMN: pa.array([], pa.float32())})
    scores = np.asarray(batch.column(QUALITY_COLUMN).to_numpy(zero_copy_only=False), np.float64)
    scored = np.flatnonzero(~np.isnan(scores))  # unscored rows (null) are never listed
    order = scored[np.argsort(scores[scored], kind="stable")][:count]
    return batch.select(["image_id", "image", "tags", QUALITY_COLUMN]).take(pa.array(order))
