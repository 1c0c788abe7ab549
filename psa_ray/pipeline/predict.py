"""Label new, untagged images with a trained DeepLab through Ray Data.

The labeling job's stage D with DeepLab in the place of its networks: `stages.stage_files` reads
and decodes (bad images become error rows), runs `SegmentActor` and writes `labels/<image_id>.png`;
`LabelSink` commits `errors/*.parquet` and the `shards/*.parquet` of each row; a rerun skips the
rows committed (`corpus.committed_keys`, the labeling job's resume). In the shards, `tags` holds
the classes present in the predicted label.
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
from psa_ray.io.keys import id_key, is_member
from psa_ray.io.rows import RowError
from psa_ray.io.inputs import read_images
from psa_ray.io.images import resize_label
from psa_ray.io.lease import hold
from psa_ray.io.storage import absolute, exists, join, write_bytes
from psa_ray.ops.forward import segment_probabilities
from psa_ray.pipeline.actors import per_batch
from psa_ray.pipeline.cluster import cluster_shape
from psa_ray.pipeline.corpus import committed_keys
from psa_ray.pipeline.readers import rows_dataset
from psa_ray.pipeline.stages import stage_files
from psa_ray.pipeline.writers import (
    LabelSink, drop_retried_errors, error_table, shard_columns, shard_defaults, write_table)
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
    layout = OutputLayout(output)
    if row_errors:
        write_table(join(layout.errors, "manifest.parquet"), error_table([e.to_dict() for e in row_errors]))
    drop_retried_errors(layout.errors)
    keys = np.array([id_key(r["image_id"]) for r in rows], dtype="S16")
    done = _committed(keys, layout.shards, layout.errors)
    todo = [r for r, skip in zip(rows, done, strict=True) if not skip]
    if todo:
        ds = stage_files(rows_dataset(todo), pipeline, [(SegmentActor, {"checkpoint": checkpoint})], has_gpu,
                         layout.labels, "label_png")
        ds.write_datasink(LabelSink(output, f"predict-{uuid.uuid4().hex[:12]}", evaluate=False,
                                    rows_per_file=pipeline.shard_rows),
                          ray_remote_args={"num_cpus": pipeline.write_cpus})
    return {"images": len(rows), "rejected_rows": len(row_errors), "skipped": int(done.sum()),
            "processed": len(todo), "labeled": int(_committed(keys, layout.shards).sum()),
            "errors": int(_committed(keys, None, layout.errors).sum())}


def _committed(keys: np.ndarray, tables: str | None, errors: str | None = None) -> np.ndarray:
    """[n] bool: which of the rows' keys are committed in `tables` or (not as manifest rows) in
    `errors` (`corpus.committed_keys`, the labeling job's resume)."""
    found = committed_keys(tables, errors)
    return np.zeros(len(keys), bool) if found is None else is_member(keys, ray.get(found))


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
