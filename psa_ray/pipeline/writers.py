"""Idempotent writers for the output location (README, "What the job guarantees").

A map step writes each labeled row's `labels/<image_id>.png` as its block is done; the sink then
commits thousands of rows at a time: the evaluation sums, the error rows, and last the
`shards/<digest>.parquet` of the labeled rows. File names derive from the image ids, never from
the run, so a rerun after a crash at any point rewrites the same names and finally commits every
row exactly once: a row is done when its id is in `shards/` or `errors/`.
"""
from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from psa_ray.io.rows import ERROR_SCHEMA
from psa_ray.io.palette import IGNORE, encode_label_png
from psa_ray.io.storage import filesystem, join, list_files, read_bytes, remove_tree, with_retries, write_bytes
from psa_ray.pipeline.layout import OutputLayout

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

# Error codes a rerun retries: storage that kept failing through every retry (`readers.decode_rows`).
# Every other error row is final: a rerun cannot fix a decode error, a missing or too large
# file, access denied, or a row an actor failed on.
RETRIED_ERRORS = ("unavailable",)
# psa: the CAMs with psa's constant background 0.2 (its README's CAM mIoU); cam: with (1-max)^alpha
EVAL_VARIANTS = ("cam", "psa", "cam_crf", "rw", "rw_crf")
# a labeled image whose ground truth was not scored, in eval/ (`eval_table`)
NOTE_TYPE = pa.struct([("image_id", pa.string()), ("code", pa.string()), ("message", pa.string())])


def digest(image_ids: Iterable[str]) -> str:
    """A short stable name for a set of image ids."""
    return hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]


def write_table(uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue())


def read_table(uri: str, columns: list[str] | None = None, present_only: bool = False) -> pa.Table:
    """One Parquet file; with present_only, the columns it lacks (written before they existed)
    are left out instead of failing."""
    data = io.BytesIO(read_bytes(uri))
    if columns is not None and present_only:
        names = set(pq.read_schema(data).names)
        columns = [c for c in columns if c in names]
    return pq.read_table(data, columns=columns)


def read_tables(prefix: str, columns: list[str] | None = None) -> pa.Table | None:
    """All Parquet files under prefix concatenated (None when there are none): for small tables
    (tests, prediction); stages read tables through Ray Data."""
    tables = [read_table(uri, columns) for uri in list_files(prefix, suffix=".parquet")]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def table_rows(prefix: str, name_prefix: str = "") -> int:
    """Rows in the Parquet files under prefix whose names start with name_prefix (footers only)."""
    total = 0
    for uri in list_files(prefix, suffix=".parquet"):
        if uri.rsplit("/", 1)[-1].startswith(name_prefix):
            fs, path = filesystem(uri)
            with with_retries(functools.partial(fs.open_input_file, path)) as f:
                total += pq.ParquetFile(f).metadata.num_rows
    return total


def class_fractions(label: np.ndarray, num_classes: int, ignore: bool = False) -> np.ndarray:
    """The share of a label map's [H,W] pixels of each value 0..num_classes-1 (background counted)
    and, with `ignore`, of 255 last: [num_classes (+ 1)] float32."""
    counts = np.bincount(label.ravel(), minlength=256)
    kept = np.concatenate([counts[:num_classes], counts[IGNORE:] if ignore else []])
    return (kept / label.size).astype(np.float32)


def shard_columns(label: np.ndarray, mean_confidence: float, num_classes: int,
                  quality: float | None = None, restored: list[int] | None = None) -> dict[str, Any]:
    """An image's shard columns from its final label [H,W] (values 0..num_classes-1, background
    counted), the mean of its per-pixel confidence, its quality score (`ops.quality`; None: not
    scored, e.g. DeepLab's predictions) and the classes the walk erased, restored from the CAM
    (`ops.pseudo_labels.restore_erased_classes`)."""
    return {"label_png": encode_label_png(label), "height": label.shape[0], "width": label.shape[1],
            "class_fractions": class_fractions(label, num_classes), "mean_confidence": mean_confidence,
            "quality": quality, "restored": np.asarray(restored or [], np.int32)}


def shard_defaults(num_classes: int) -> dict[str, Any]:
    """The shard columns of a row that has no label (an error row)."""
    return {"label_png": b"", "height": 0, "width": 0, "class_fractions": np.zeros(num_classes, np.float32),
            "mean_confidence": 0.0, "quality": None, "restored": np.zeros(0, np.int32)}


def error_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{k: str(r.get(k, "")) for k in ERROR_SCHEMA.names} for r in rows], schema=ERROR_SCHEMA)


def drop_retried_errors(folder: str) -> int:
    """Take the rows of RETRIED_ERRORS codes out of the error files under folder (manifest rows
    aside), so that this run does them again; returns how many. Each file is rewritten without
    them (or removed): a crash in between leaves a row to do, never in two places."""
    dropped = 0
    for uri in list_files(folder, suffix=".parquet"):
        table = read_table(uri)
        retried = pc.and_(pc.is_in(table.column("error"), pa.array(RETRIED_ERRORS)),
                          pc.not_equal(table.column("stage"), "manifest"))
        count = pc.sum(retried).as_py() or 0
        if count == table.num_rows:
            remove_tree(uri)
        elif count:
            write_table(uri, table.filter(pc.invert(retried)))
        dropped += count
    return dropped


def write_row_files(batch: dict[str, np.ndarray], *, folder: str, column: str,
                    counter: Any = None) -> dict[str, np.ndarray]:
    """Write column `column` (PNG bytes) of each error-free row to `<folder>/<image_id>.png`, and
    count the batch's rows on `counter` (a `progress.RowCounter`), if given.

    A map step before a committing sink: the files of a block land as it is done, while the
    sink commits thousands of rows at a time. A file written again on a rerun gets the same name.
    """
    for image_id, data, error in zip(batch["image_id"], batch[column], batch["error"], strict=True):
        if not error:
            write_bytes(join(folder, f"{image_id}.png"), bytes(data))
    if counter is not None:
        counter.add.remote(len(batch["image_id"]))
    return batch


def block_rows(blocks: Iterable[Block]) -> list[dict[str, Any]]:
    """The rows of a sink's blocks, as dicts."""
    rows: list[dict[str, Any]] = []
    for block in blocks:
        rows.extend(BlockAccessor.for_block(block).iter_rows(public_row_format=False))
    return rows


class IndexSink(Datasink[int]):
    """Commits `<folder>/<digest>.parquet` (column image_id) for the error-free rows, thousands at a
    time: the seeds written by `write_row_files` that a rerun need not redo. With
    `with_seed_fractions`, also each image's `tags` and `seed_fractions` (for `seed_statistics`).
    The failed rows go to `<errors_uri>/<digest>.parquet` (ERROR_SCHEMA), first."""

    def __init__(self, folder_uri: str, rows_per_file: int, with_seed_fractions: bool = False,
                 errors_uri: str | None = None):
        self.folder, self.rows_per_file, self.with_seed_fractions = folder_uri, rows_per_file, with_seed_fractions
        self.errors = errors_uri

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> int:
        rows = block_rows(blocks)
        failed = [r for r in rows if r["error"]]
        if failed and self.errors:
            write_table(join(self.errors, f"{digest(r['image_id'] for r in failed)}.parquet"), error_table(failed))
        rows = [r for r in rows if not r["error"]]
        if not rows:
            return 0
        columns: dict[str, Any] = {"image_id": [r["image_id"] for r in rows]}
        if self.with_seed_fractions:
            columns["tags"] = [[t for t in str(r["tag_names"]).split("|") if t] for r in rows]
            columns["seed_fractions"] = pa.array([np.asarray(r["seed_fractions"], np.float32).tolist()
                                                  for r in rows], pa.list_(pa.float32()))
        write_table(join(self.folder, f"{digest(columns['image_id'])}.parquet"), pa.table(columns))
        return len(rows)


class LabelSink(Datasink[dict[str, int]]):
    """Stage-D commit, thousands of rows a write (`rows_per_file`): eval/, errors/, then shards/.

    The label PNGs are already written (`write_row_files`); a row is done once its shard is.
    eval/<digest>.parquet holds the summed confusion matrices of shards/<digest>.parquet's
    images and the notes on those not scored (`eval_table`; written first: metrics count an eval
    file only beside its shard).
    """

    def __init__(self, output_uri: str, run_id: str, evaluate: bool, rows_per_file: int = 2048):
        self.output, self.run_id, self.evaluate = OutputLayout(output_uri), run_id, evaluate
        self.rows_per_file = rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> dict[str, int]:
        rows = block_rows(blocks)
        good = [r for r in rows if not r["error"]]
        bad = [r for r in rows if r["error"]]
        name = digest(r["image_id"] for r in good)
        if self.evaluate and good:
            write_table(join(self.output.eval, f"{name}.parquet"), eval_table(good))
        if bad:
            write_table(join(self.output.errors, f"{digest(r['image_id'] for r in bad)}.parquet"),
                        error_table(bad))
        if good:
            write_table(join(self.output.shards, f"{name}.parquet"), shard_table(good, self.run_id))
        return {"labeled": len(good), "errors": len(bad)}


def eval_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The evaluation record of a shard's labeled rows: `images` scored, each variant's summed
    confusion matrix `cm_<variant>` (empty when none was scored), and `notes`: (image_id, code,
    message) of each row whose ground truth was not scored (`actors.RefineActor.scores`)."""
    scored = [r for r in rows if len(r[f"cm_{EVAL_VARIANTS[0]}"])]
    notes = [{"image_id": r["image_id"], "code": r["gt_note"], "message": r["gt_message"]}
             for r in rows if r.get("gt_note")]
    return pa.table({
        "images": [len(scored)],
        **{f"cm_{v}": pa.array([np.sum([np.asarray(r[f"cm_{v}"], np.int64) for r in scored], axis=0).tolist()
                                if scored else []], pa.list_(pa.int64())) for v in EVAL_VARIANTS},
        "notes": pa.array([notes], pa.list_(NOTE_TYPE))})


def shard_table(rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    """The shard schema (README, "Labeling your corpus", Output): one row per labeled image."""
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
        "quality": pa.array([None if r.get("quality") is None else float(r["quality"]) for r in rows],
                            pa.float32()),
        "restored": pa.array([np.asarray(r.get("restored", []), np.int32).tolist() for r in rows],
                             pa.list_(pa.int32())),
        "run_id": [run_id] * len(rows),
    })

