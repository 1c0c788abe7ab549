"""Label quality without ground truth over a run's committed files: the statistics of its labels
and seeds, and the review list. The files are read and cut down in Ray read tasks (the plain
functions of `quality_rules`), so neither the driver's memory nor its I/O grows with the corpus.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from psa_ray.pipeline.datasources import READ_CPUS, parquet_dataset
from psa_ray.pipeline.quality_rules import QUALITY_COLUMN, block_sums, lowest, summarize_labels, summarize_seeds
from psa_ray.pipeline.ray_types import arrow_batches, batch_fn
from psa_ray.pipeline.layout import OutputLayout


def _summed(prefix: str, column: str, class_names: list[str]) -> dict[str, Any] | None:
    """`block_sums` of every Parquet file under prefix, summed (None: no file, or no row counted).
    The files are read and summed in Ray tasks, a file per task; the driver adds up a row per file."""
    ds = parquet_dataset(prefix, ["tags", column, "mean_confidence", "restored"])
    if ds is None:
        return None
    total: dict[str, Any] = {}
    sums = ds.map_batches(batch_fn(block_sums), batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
                          fn_kwargs={"column": column, "class_names": class_names})
    for row in sums.iter_rows():
        for name, value in row.items():
            total[name] = total.get(name, 0) + np.asarray(value, np.float64)
    return total if total and total["images"] else None


def label_statistics(output: str, class_names: list[str]) -> dict[str, Any] | None:
    """`summarize_labels` of the labels committed under `output` (None: none yet), summed from
    shards/ (tags, class_fractions, mean_confidence)."""
    total = _summed(OutputLayout(output).shards, "class_fractions", class_names)
    return None if total is None else summarize_labels(total, class_names)


def seed_statistics(output: str, class_names: list[str]) -> dict[str, Any] | None:
    """`summarize_seeds` of stage B's confident seeds (None: no seeds, e.g. a given AffinityNet),
    summed from index/seeds/ (seed_fractions)."""
    total = _summed(OutputLayout(output).seed_index, "seed_fractions", class_names)
    return None if total is None else summarize_seeds(total, class_names)


def review_rows(output: str, count: int) -> list[dict[str, Any]]:
    """The `count` labeled images of lowest quality score, lowest first: {image_id, image,
    tag_names, quality}. Each shard file is cut to its lowest `count` in a Ray task; the driver
    keeps `count` rows at a time."""
    ds = parquet_dataset(OutputLayout(output).shards, ["image_id", "image", "tags", QUALITY_COLUMN])
    if ds is None or count <= 0:
        return []
    kept: list[dict[str, Any]] = []
    cut = ds.map_batches(batch_fn(lowest), batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
                         fn_kwargs={"count": count})
    for batch in arrow_batches(cut, batch_size=4096):
        kept = sorted(kept + batch.to_pylist(), key=lambda r: (r[QUALITY_COLUMN], r["image_id"]))[:count]
    return [{"image_id": r["image_id"], "image": r["image"], "tag_names": list(r["tags"]),
             "quality": float(r[QUALITY_COLUMN])} for r in kept]
