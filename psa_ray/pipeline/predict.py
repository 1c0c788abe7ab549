"""Label new, untagged images with a trained DeepLab through Ray Data.

Same pieces and output layout as the labeling job's stage D: `decoded_dataset` reads and decodes
(bad images become error rows), `SegmentActor` runs the network, and `LabelSink` writes
`labels/<image_id>.png`, `errors/*.parquet` and the `shards/*.parquet` that commit each row, so
a rerun over the same output skips the images already done. In the shards, `tags` holds the
classes present in the predicted label.
"""
from __future__ import annotations

import io
import posixpath
import uuid
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import ray
import torch

from psa_ray.config import PipelineConfig
from psa_ray.io.manifest import MANIFEST_FORMATS, ManifestError, RowError, validate_records
from psa_ray.io.images import resize_label
from psa_ray.io.palette import encode_label_png
from psa_ray.io.storage import join, list_files, parent, read_bytes, redact
from psa_ray.ops.forward import segment_probabilities
from psa_ray.pipeline.actors import inference_device, per_batch
from psa_ray.pipeline.readers import decoded_dataset, rows_dataset
from psa_ray.pipeline.writers import (
    LabelSink, done_ids, error_table, read_tables, write_row_files, write_table)
from psa_ray.models.inference import autocast_dtype, load_trained, read_meta, to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".avif")
FOLDER_SEPARATOR = "__"  # stands for '/' in the ids of images in subfolders


class SegmentActor:
    """GPU stage: a trained DeepLab labels each decoded row (argmax at the image size), the whole
    batch at once (`per_batch`)."""

    def __init__(self, checkpoint: str):
        self.device = inference_device()
        self.model = load_trained(checkpoint, self.device)
        self.autocast = autocast_dtype(self.device, mixed_precision=True)
        self.class_names = list(read_meta(checkpoint)["class_names"])

    def _label(self, probs: torch.Tensor, height: int, width: int) -> dict[str, Any]:
        """Class probabilities [K,h,w] of an image (maybe shrunk for processing) -> its label at
        the full `height` x `width`, with the shard's columns."""
        confidence, label = probs.max(dim=0)
        label = resize_label(label.to(torch.uint8).cpu().numpy(), height, width)
        counts = np.bincount(label.ravel(), minlength=probs.shape[0])
        present = [self.class_names[k - 1] for k in np.flatnonzero(counts[1:]) + 1]
        return {"label_png": encode_label_png(label), "height": label.shape[0], "width": label.shape[1],
                "class_fractions": (counts / label.size).astype(np.float32),
                "mean_confidence": float(confidence.mean()), "tag_names": "|".join(present)}

    def _rows(self, batch: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, Any]]:
        probs = segment_probabilities(self.model, [to_tensor(batch["rgb"][i]).to(self.device) for i in rows],
                                      self.autocast)
        return [self._label(p, int(batch["orig_height"][i]), int(batch["orig_width"][i]))
                for p, i in zip(probs, rows)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        columns: dict[str, Any] = {"label_png": b"", "height": 0, "width": 0,
                                   "class_fractions": np.zeros(self.model.num_classes, np.float32),
                                   "mean_confidence": 0.0, "tag_names": ""}
        out = per_batch(batch, "predict", lambda rows: self._rows(batch, rows), columns)
        return {k: out[k] for k in ["image_id", "image", "stage", "error", "message", *columns]}


def _manifest_records(uri: str, fmt: str) -> list[dict[str, Any]]:
    """(image_id, image) records of a manifest; other columns (tags) are ignored."""
    try:
        data = io.BytesIO(read_bytes(uri))
        if fmt == "parquet":
            table = pq.read_table(data)
        elif fmt == "csv":
            strings = {"image_id": pa.string(), "image": pa.string()}
            table = pa_csv.read_csv(data, convert_options=pa_csv.ConvertOptions(column_types=strings))
        else:
            table = pa_json.read_json(data)
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {uri}") from None
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"manifest {uri} is not readable {fmt}: {redact(str(e))}") from None
    missing = [c for c in ("image_id", "image") if c not in table.column_names]
    if missing:
        raise ManifestError(f"manifest {uri} lacks column(s) {', '.join(missing)}")
    return table.select(["image_id", "image"]).to_pylist()


def _folder_records(folder: str) -> list[dict[str, Any]]:
    """One record per image file under a folder/prefix; id: its path below it, no suffix."""
    prefix = folder.rstrip("/") + "/"
    return [{"image_id": posixpath.splitext(uri[len(prefix):])[0].replace("/", FOLDER_SEPARATOR),
             "image": uri}
            for uri in list_files(folder) if uri.lower().endswith(IMAGE_SUFFIXES)]


def image_rows(input_uri: str) -> tuple[list[dict[str, Any]], list[RowError]]:
    """Rows (image_id, image URI) to label, and the rejected ones (stage "manifest").

    input_uri: a manifest (.parquet/.jsonl/.csv with columns image_id and image, as for the
    labeling job; tags are not needed) or a folder/prefix of images (ids from the file names,
    '/' in subfolder paths written as '__'). Raises ManifestError when nothing can be read.
    """
    fmt = posixpath.splitext(input_uri.rstrip("/"))[1].lower().lstrip(".")
    if fmt in MANIFEST_FORMATS:
        records, base = _manifest_records(input_uri, fmt), parent(input_uri)
    else:
        records, base = _folder_records(input_uri), input_uri
    if not records:
        raise ManifestError(f"no images in {input_uri} (a manifest ends in "
                            f"{', '.join('.' + f for f in MANIFEST_FORMATS)}; a folder holds "
                            f"{', '.join(IMAGE_SUFFIXES)} files)")
    rows, errors = validate_records([{**r, "where": f"row {n}"} for n, r in enumerate(records, 1)],
                                    None, base)
    return [{"image_id": r.image_id, "image": r.image} for r in rows], errors


def predict(rows: list[dict[str, Any]], checkpoint: str, output: str, pipeline: PipelineConfig,
            has_gpu: bool, row_errors: Sequence[RowError] = ()) -> dict[str, int]:
    """Label rows (image_id, image) with the DeepLab weights `checkpoint` (meta.json beside them)
    into `output`, and record `row_errors` (rejected input rows) in its errors/. Rows already in
    its shards/ or errors/ are skipped. Returns counts: images, rejected_rows, skipped,
    processed, and over all rows, labeled and errors."""
    if row_errors:
        write_table(join(output, "errors", "manifest.parquet"),
                    error_table([e.to_dict() for e in row_errors]))
    done = done_ids(output)
    todo = [r for r in rows if r["image_id"] not in done]
    if todo:
        ds = decoded_dataset(rows_dataset(todo), num_cpus=pipeline.decode_cpus, max_side=pipeline.max_side)
        ds = ds.map_batches(SegmentActor, fn_constructor_kwargs={"checkpoint": checkpoint},
                            batch_size=pipeline.batch_size,
                            compute=ray.data.ActorPoolStrategy(min_size=pipeline.gpu_pool[0],
                                                               max_size=pipeline.gpu_pool[1]),
                            num_gpus=pipeline.gpu_actor_gpus if has_gpu else 0,
                            num_cpus=pipeline.gpu_actor_cpus)
        ds = ds.map_batches(write_row_files, num_cpus=pipeline.write_cpus,
                            fn_kwargs={"folder": join(output, "labels"), "column": "label_png"})
        ds.write_datasink(LabelSink(output, f"predict-{uuid.uuid4().hex[:12]}", evaluate=False,
                                    rows_per_file=pipeline.shard_rows),
                          ray_remote_args={"num_cpus": pipeline.write_cpus})
    ids = {r["image_id"] for r in rows}
    shards = read_tables(join(output, "shards"), columns=["image_id"])
    errors = read_tables(join(output, "errors"), columns=["image_id", "stage"])
    labeled = set() if shards is None else set(shards.column("image_id").to_pylist())
    failed = set() if errors is None else {r["image_id"] for r in errors.to_pylist()
                                           if r["stage"] != "manifest"}
    return {"images": len(rows), "rejected_rows": len(row_errors), "skipped": len(done & ids),
            "processed": len(todo), "labeled": len(ids & labeled), "errors": len(ids & failed)}
