"""Ray Data readers: corpus rows -> decoded images, with bad rows kept (and flagged) rather than lost."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import ray

from psa_ray.config import PipelineConfig
from psa_ray.io.images import ImageDecodeError, decode_scaled, resize_label
from psa_ray.io.seeds import decode_seed
from psa_ray.io.rows import Corpus
from psa_ray.io.storage import ObjectTooLargeError, is_transient, join, list_files, read_bytes
from psa_ray.io.redact import redact
from psa_ray.pipeline.ray_compat import repartition
from psa_ray.pipeline.writers import digest, error_table, write_table

# Larger files are rejected unread (a video or an archive in the manifest must not OOM a worker).
MAX_IMAGE_BYTES = 256 * 2**20
# A decoded row that failed carries this placeholder image and a non-empty `error`.
_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


# Images are read, decoded and labeled in blocks of this many rows, so that they spread over actors.
ROWS_PER_BLOCK = 16


def rows_dataset(rows: Iterable[dict[str, Any]]) -> ray.data.Dataset:
    """A small in-memory list of pipeline rows (tests, benchmarks, prediction) as a Dataset."""
    rows = list(rows)
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), -(-len(rows) // ROWS_PER_BLOCK))))


def corpus_rows(corpus: Corpus, gt: str | None) -> list[dict[str, Any]]:
    """A small in-memory corpus (tests, benchmarks, the train_* jobs) as pipeline rows, the
    columns of `corpus.corpus_dataset`: multi-hot `tags`, `tag_names` ('|'-joined) and `gt_uri`
    (`<gt>/<image_id>.png`, '' without gt; a missing file means no ground truth)."""
    return [{"image_id": row.image_id, "image": row.image, "tag_names": "|".join(row.tags),
             "tags": corpus.tag_vector(row), "gt_uri": join(gt, f"{row.image_id}.png") if gt else ""}
            for row in corpus.rows]


def with_masks(rows: list[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    """The rows that have `<folder>/<image_id>.png` (seeds, labels or true masks), with `mask_uri`
    (small in-memory corpora; the labeling job looks masks up in committed tables instead)."""
    have = set(list_files(folder, suffix=".png"))
    return [{**r, "mask_uri": uri} for r in rows if (uri := join(folder, f"{r['image_id']}.png")) in have]


def with_mask_uri(batch: dict[str, np.ndarray], *, folder: str) -> dict[str, np.ndarray]:
    """A batch of rows with `mask_uri` = `<folder>/<image_id>.png` (masks known to exist)."""
    return {**batch, "mask_uri": np.array([join(folder, f"{i}.png") for i in batch["image_id"]], dtype=object)}


def _read_row(image_uri: str, mask_uri: str | None,
              max_side: int | None) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    """(rgb [h,w,3], mask [h,w] or None, full height, full width) of one row."""
    image = decode_scaled(read_bytes(image_uri, max_bytes=MAX_IMAGE_BYTES), max_side=max_side)
    rgb, mask = image.rgb, None
    if mask_uri is not None:
        mask = decode_seed(read_bytes(mask_uri))  # a label map, or stage-B seed scores (io/seeds.py)
        if mask.shape == (image.height, image.width):
            mask = resize_label(mask, *rgb.shape[:2])
        if mask.shape[-2:] != rgb.shape[:2]:
            raise ImageDecodeError(f"mask {mask.shape} matches neither the image "
                                   f"{(image.height, image.width)} nor its processing size {rgb.shape[:2]}")
    return rgb, mask, image.height, image.width


def _row_error(error: Exception) -> tuple[str, str]:
    """(code, message) of a row that could not be read or decoded."""
    if isinstance(error, FileNotFoundError):
        return "missing", f"not found: {error}"
    if isinstance(error, ImageDecodeError):
        return "decode", str(error)
    if isinstance(error, ObjectTooLargeError):
        return "too_large", str(error)
    if is_transient(error):
        return "unavailable", f"storage kept failing after retries ({type(error).__name__}: {error})"
    return "read", f"{type(error).__name__}: {error}"


def decode_rows(batch: dict[str, np.ndarray], *, max_side: int | None = PipelineConfig.max_side) -> dict[str, Any]:
    """Read and decode each row's image (and `mask_uri`, if present) into `rgb` (and `mask`).

    Images with a long side above max_side are shrunk (aspect kept, `images.processing_size`);
    `orig_height`/`orig_width` hold the full upright size, to which labels are restored. A mask
    may come at either size and is resized (nearest) to the processing size.

    A row that cannot be read or decoded keeps a 1x1 placeholder (orig size 0 x 0), stage "read"
    and an `error` code, so that it is accounted for downstream instead of failing the dataset:
    `missing` (no such file/object), `unavailable` (storage failed transiently through every
    retry: a later run may succeed), `read` (other storage errors, e.g. access denied),
    `too_large` (a file over MAX_IMAGE_BYTES), `decode` (not a usable image; the message says why).
    """
    n = len(batch["image_id"])
    rgbs: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    heights, widths = np.zeros(n, np.int64), np.zeros(n, np.int64)
    errors, messages = [""] * n, [""] * n  # error: a short code; message: for people
    has_mask = "mask_uri" in batch
    for i in range(n):
        rgb, mask = _PLACEHOLDER, np.zeros((1, 1), np.uint8)
        try:
            rgb, row_mask, heights[i], widths[i] = _read_row(
                str(batch["image"][i]), str(batch["mask_uri"][i]) if has_mask else None, max_side)
            if row_mask is not None:
                mask = row_mask
        except Exception as e:  # a bad row must not fail the dataset
            errors[i], message = _row_error(e)
            messages[i] = redact(message)[:500]
        rgbs.append(rgb)
        masks.append(mask)
    out = dict(batch)
    out["rgb"] = object_column(rgbs)
    if has_mask:
        out["mask"] = object_column(masks)
    out["orig_height"], out["orig_width"] = heights, widths
    out["stage"] = np.array(["read" if e else "" for e in errors], dtype=object)
    out["error"] = np.array(errors, dtype=object)
    out["message"] = np.array(messages, dtype=object)
    return out


def decoded_dataset(rows: ray.data.Dataset, *, num_cpus: float = 1.0,
                    max_side: int | None = PipelineConfig.max_side) -> ray.data.Dataset:
    """Pipeline rows in blocks of ROWS_PER_BLOCK, then `decode_rows` in CPU tasks (S3 endpoint
    from AWS_ENDPOINT_URL)."""
    blocks = repartition(rows, ROWS_PER_BLOCK, num_cpus)  # with num_cpus: fused with the step before
    return blocks.map_batches(decode_rows, batch_size=8, num_cpus=num_cpus, fn_kwargs={"max_side": max_side})


def keep_decoded(batch: dict[str, np.ndarray], *, errors: str | None = None) -> dict[str, np.ndarray]:
    """Keep the rows that decoded. With `errors` (a folder), each failed row is also written to
    `<errors>/read-<digest of its id>.parquet` (ERROR_SCHEMA): one file a row, so that a training
    loop that reads its rows every epoch rewrites the same files. Without, the caller accounts for
    them elsewhere (the labeling job: stage D records the same rows)."""
    failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
    if errors is not None:
        for i in np.flatnonzero(failed):
            row = {k: batch[k][i] for k in ("image_id", "image", "stage", "error", "message")}
            write_table(join(errors, f"read-{digest([str(row['image_id'])])}.parquet"), error_table([row]))
    return {k: v[~failed] for k, v in batch.items()}


def object_column(values: Sequence[Any]) -> np.ndarray:
    """An object array of per-row values, e.g. arrays of other shapes (Ray stores it as a
    variable-shaped tensor column)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out
