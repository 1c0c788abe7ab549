"""Label new, untagged images with a trained DeepLab through Ray Data.

Same pieces and output layout as the labeling job's stage D: `decoded_dataset` reads and decodes
(bad images become error rows), `SegmentActor` runs the network, and `LabelSink` writes
`labels/<image_id>.png`, `errors/*.parquet` and the `shards/*.parquet` that commit each row, so
a rerun over the same output skips the images already done. In the shards, `tags` holds the
classes present in the predicted label.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import ray
import torch

from psa_ray.config import PRESETS, PipelineConfig, default_preset
from psa_ray.errors import UserError
from psa_ray.io.rows import RowError
from psa_ray.io.inputs import read_images
from psa_ray.io.images import resize_label
from psa_ray.io.lease import hold
from psa_ray.io.storage import absolute, exists, join, write_bytes
from psa_ray.ops.forward import segment_probabilities
from psa_ray.pipeline.actors import per_batch
from psa_ray.pipeline.cluster import cluster_shape
from psa_ray.pipeline.ray_types import batch_fn
from psa_ray.pipeline.readers import decoded_dataset, rows_dataset
from psa_ray.pipeline.writers import (
    LabelSink, committed_ids, drop_retried_errors, error_table, shard_columns, shard_defaults, write_row_files,
    write_table)
from psa_ray.models.inference import (
    autocast_dtype, check_weights, input_normalization, load_trained, read_meta, to_tensor)
from psa_ray.train.loop import ray_device
from psa_ray.pipeline.layout import OutputLayout


class SegmentActor:
    """GPU stage: a trained DeepLab labels each decoded row (argmax at the image size), the whole
    batch at once (`per_batch`)."""

    def __init__(self, checkpoint: str):
        self.device = ray_device()
        self.model = load_trained(checkpoint, self.device)
        self.autocast = autocast_dtype(self.device, mixed_precision=True)
        self.class_names = list(read_meta(checkpoint)["class_names"])

    def _label(self, probs: torch.Tensor, height: int, width: int) -> dict[str, Any]:
        """Class probabilities [K,h,w] of an image (maybe shrunk for processing) -> its label at
        the full `height` x `width`, with the shard's columns."""
        confidence, label = probs.max(dim=0)
        full = resize_label(label.to(torch.uint8).cpu().numpy(), height, width)
        columns = shard_columns(full, float(confidence.mean()), probs.shape[0])
        present = [self.class_names[k - 1] for k in np.flatnonzero(columns["class_fractions"][1:]) + 1]
        return {**columns, "tag_names": "|".join(present)}

    def _rows(self, batch: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, Any]]:
        normalization = input_normalization(self.model)
        probs = segment_probabilities(self.model, [to_tensor(batch["rgb"][i], normalization).to(self.device)
                                                   for i in rows],
                                      self.autocast)
        return [self._label(p, int(batch["orig_height"][i]), int(batch["orig_width"][i]))
                for p, i in zip(probs, rows, strict=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        num_classes = cast(int, self.model.num_classes)  # a DeepLab's (nn.Module types attributes Tensor | Module)
        columns = {**shard_defaults(num_classes), "tag_names": ""}
        out = per_batch(batch, "predict", lambda rows: self._rows(batch, rows), columns)
        return {k: out[k] for k in ["image_id", "image", "stage", "error", "message", *columns]}


def predict(rows: list[dict[str, Any]], checkpoint: str, output: str, pipeline: PipelineConfig,
            has_gpu: bool, row_errors: Sequence[RowError] = ()) -> dict[str, int]:
    """Label rows (image_id, image) with the DeepLab weights `checkpoint` (meta.json beside them)
    into `output`, and record `row_errors` (rejected input rows) in its errors/. Rows already in
    its shards/ or errors/ are skipped, except those that failed for a reason a rerun may not meet
    again (`writers.RETRIED_ERRORS`). Returns counts: images, rejected_rows, skipped, processed,
    and over all rows, labeled and errors."""
    if row_errors:
        write_table(join(OutputLayout(output).errors, "manifest.parquet"),
                    error_table([e.to_dict() for e in row_errors]))
    drop_retried_errors(OutputLayout(output).errors)
    done = set().union(*committed_ids(output))
    todo = [r for r in rows if r["image_id"] not in done]
    if todo:
        ds = decoded_dataset(rows_dataset(todo), num_cpus=pipeline.decode_cpus, max_side=pipeline.max_side)
        ds = ds.map_batches(SegmentActor, fn_constructor_kwargs={"checkpoint": checkpoint},
                            batch_size=pipeline.batch_size,
                            compute=ray.data.ActorPoolStrategy(min_size=pipeline.gpu_pool[0],
                                                               max_size=pipeline.gpu_pool[1]),
                            num_gpus=pipeline.gpu_actor_gpus if has_gpu else 0,
                            num_cpus=pipeline.gpu_actor_cpus)
        ds = ds.map_batches(batch_fn(write_row_files), num_cpus=pipeline.write_cpus,
                            fn_kwargs={"folder": OutputLayout(output).labels, "column": "label_png"})
        ds.write_datasink(LabelSink(output, f"predict-{uuid.uuid4().hex[:12]}", evaluate=False,
                                    rows_per_file=pipeline.shard_rows),
                          ray_remote_args={"num_cpus": pipeline.write_cpus})
    ids = {r["image_id"] for r in rows}
    labeled, failed = committed_ids(output)
    return {"images": len(rows), "rejected_rows": len(row_errors), "skipped": len(done & ids),
            "processed": len(todo), "labeled": len(ids & labeled), "errors": len(ids & failed)}


@dataclass(frozen=True)
class PredictJob:
    """Options of `jobs/predict.py` (see its --help)."""

    checkpoint: str
    input: str
    output: str
    preset: str | None = None          # None: demo on a small CPU-only cluster, else paper
    use_gpu: bool | None = None        # None: use GPUs if the cluster has them now


def run(job: PredictJob) -> dict[str, Any]:
    """Label the images of `job.input` into `job.output` (not a labeling run's output) on the
    connected cluster; writes and returns the summary (predict.json). The job holds the output's
    lease (`io.lease`) while it runs: another job writing there is refused."""
    run_id = uuid.uuid4().hex[:12]
    with hold(absolute(job.output) or job.output, run_id, "predict"):
        return _run(job)


def _run(job: PredictJob) -> dict[str, Any]:
    if exists(OutputLayout(job.output).run_record):
        raise UserError(f"{job.output} holds a labeling run (run.json); its labels/ would mix with "
                        "the predictions: pass another --output")
    check_weights("--checkpoint", job.checkpoint, trained=True)
    rows, row_errors = read_images(job.input)
    shape = cluster_shape(job.use_gpu)
    preset = default_preset(job.preset, demo=shape.small)
    started = time.perf_counter()
    counts = predict(rows, job.checkpoint, job.output, PRESETS[preset].pipeline, shape.has_gpu, row_errors)
    summary = {"checkpoint": job.checkpoint, "input": job.input, "output": job.output,
               "preset": preset, "has_gpu": shape.has_gpu, "counts": counts,
               "seconds": round(time.perf_counter() - started, 2)}
    write_bytes(OutputLayout(job.output).predictions, json.dumps(summary, indent=2).encode())
    return summary
