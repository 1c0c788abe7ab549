"""Idempotent writers for the output location (design.md, "Output location").

Per block of rows, the sink writes each labeled row's `labels/<image_id>.png`, then the
evaluation rows, the error rows, and last the `shards/<digest>.parquet` that commits the labeled
rows. File names derive from the image ids, never from the run, so a rerun after a crash at any
point rewrites the same names and finally commits every row exactly once: a row is done when its
id is in `shards/` or `errors/` (`done_ids`).
"""
from __future__ import annotations

import hashlib
import io
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from psa_ray.io.manifest import ERROR_SCHEMA
from psa_ray.io.storage import join, list_files, read_bytes, write_bytes

# psa: the CAMs with psa's constant background 0.2 (its README's CAM mIoU); cam: with (1-max)^alpha
EVAL_VARIANTS = ("cam", "psa", "cam_crf", "rw", "rw_crf")


def digest(image_ids: Iterable[str]) -> str:
    """A short stable name for a set of image ids."""
    return hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]


def write_table(uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue())


def read_tables(prefix: str, columns: list[str] | None = None) -> pa.Table | None:
    """All Parquet files under prefix concatenated (None when there are none)."""
    tables = [pq.read_table(io.BytesIO(read_bytes(uri)), columns=columns)
              for uri in list_files(prefix, suffix=".parquet")]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def done_ids(output_uri: str) -> set[str]:
    """Ids already committed to shards/ or errors/ by earlier runs.

    Manifest errors are left out: they are rewritten by every run, and a rejected duplicate
    shares its id with the row that was kept and still has to be labeled.
    """
    ids: set[str] = set()
    shards = read_tables(join(output_uri, "shards"), columns=["image_id"])
    if shards is not None:
        ids.update(shards.column("image_id").to_pylist())
    errors = read_tables(join(output_uri, "errors"), columns=["image_id", "stage"])
    if errors is not None:
        ids.update(r["image_id"] for r in errors.to_pylist() if r["stage"] != "manifest")
    return ids


def error_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{k: str(r.get(k, "")) for k in ERROR_SCHEMA.names} for r in rows], schema=ERROR_SCHEMA)


class PngSink(Datasink):
    """Writes column `png` of each error-free row to `<folder>/<image_id>.png` (stage-B seeds)."""

    def __init__(self, folder_uri: str):
        self.folder = folder_uri

    def write(self, blocks, ctx) -> int:
        written = 0
        for block in blocks:
            for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                if not row["error"]:
                    write_bytes(join(self.folder, f"{row['image_id']}.png"), bytes(row["png"]))
                    written += 1
        return written


class LabelSink(Datasink):
    """Stage-D writer: labels/, eval/, errors/, then shards/ (the commit) for each block."""

    def __init__(self, output_uri: str, run_id: str, evaluate: bool):
        self.output, self.run_id, self.evaluate = output_uri, run_id, evaluate

    def write(self, blocks, ctx) -> dict[str, int]:
        counts = {"labeled": 0, "errors": 0}
        for block in blocks:
            rows = list(BlockAccessor.for_block(block).iter_rows(public_row_format=False))
            good = [r for r in rows if not r["error"]]
            bad = [r for r in rows if r["error"]]
            for r in good:
                write_bytes(join(self.output, "labels", f"{r['image_id']}.png"), bytes(r["label_png"]))
            if self.evaluate and good:
                write_table(join(self.output, "eval", f"{digest(r['image_id'] for r in good)}.parquet"),
                            pa.Table.from_pylist([
                                {"image_id": r["image_id"],
                                 **{f"cm_{v}": np.asarray(r[f"cm_{v}"], np.int64).tolist()
                                    for v in EVAL_VARIANTS}} for r in good]))
            if bad:
                write_table(join(self.output, "errors", f"{digest(r['image_id'] for r in bad)}.parquet"),
                            error_table(bad))
            if good:
                write_table(join(self.output, "shards", f"{digest(r['image_id'] for r in good)}.parquet"),
                            shard_table(good, self.run_id))
            counts["labeled"] += len(good)
            counts["errors"] += len(bad)
        return counts


def shard_table(rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    """The shard schema of design.md: one row per labeled image."""
    return pa.table({
        "image_id": [r["image_id"] for r in rows],
        "image": [str(r["image"]) for r in rows],
        "tags": [[t for t in str(r["tag_names"]).split("|") if t] for r in rows],
        "height": pa.array([int(r["height"]) for r in rows], pa.int32()),
        "width": pa.array([int(r["width"]) for r in rows], pa.int32()),
        "label_png": pa.array([bytes(r["label_png"]) for r in rows], pa.binary()),
        "class_fractions": pa.array([np.asarray(r["class_fractions"], np.float32).tolist() for r in rows],
                                    pa.list_(pa.float32())),
        "mean_confidence": pa.array([float(r["mean_confidence"]) for r in rows], pa.float32()),
        "run_id": [run_id] * len(rows),
    })

