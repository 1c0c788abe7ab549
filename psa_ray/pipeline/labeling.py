"""The whole labeling job: stages A-E (`pipeline.stages`) over one output location.

Each stage reads what the previous one wrote under the output, so a rerun resumes: a trained
network's exported weights skip its training, existing seeds are not recomputed, and committed
labels are not relabeled.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import posixpath
import time
import uuid
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from psa_ray.config import PRESETS, Preset, default_preset, pretrained_preset, to_dict
from psa_ray.data import CORPORA
from psa_ray.errors import UserError
from psa_ray.io.lease import hold
from psa_ray.io.keys import held_out_rule
from psa_ray.io.rows import Corpus, CorpusRow
from psa_ray.io.storage import absolute, exists, join, list_files, read_bytes, write_bytes
from psa_ray.io.redact import redact
from psa_ray.models.inference import check_weights, read_meta
from psa_ray.models.weights import WeightsError, builtin_weights
from psa_ray.pipeline.cluster import cluster_shape
from psa_ray.pipeline.builtin import builtin_corpus
from psa_ray.pipeline.corpus import CorpusIndex, committed_keys, corpus_dataset, prepare_corpus
from psa_ray.pipeline.datasources import READ_CPUS
from psa_ray.pipeline.quality import label_statistics, review_rows, seed_statistics
from psa_ray.pipeline.quality_rules import quality_warnings
from psa_ray.pipeline.ray_types import batch_fn
from psa_ray.pipeline.readers import corpus_rows, decoded_dataset, keep_decoded, with_mask_uri
from psa_ray.pipeline.report import write_report
from psa_ray.pipeline.scoring import evaluation
from psa_ray.pipeline.layout import OutputLayout
from psa_ray.pipeline.progress import StageProgress, stage
from psa_ray.pipeline.stages import label_stage, seed_stage, stall_ends_job, train_stage, watch_progress
from psa_ray.pipeline.writers import (
    EVAL_VARIANTS, drop_retried_errors, read_table, table_rows)
from psa_ray.train.evaluate import classifier_ap
from psa_ray.train.tasks import Init

REVIEW_ROWS = 200  # report/review.csv: the least trustworthy images, pictures of the first few


@dataclass
class LabelJob:
    """Options of `jobs/label_dataset.py` (see its --help)."""

    output: str
    input: str | None = None           # manifest or VOC folder; None = built-in synthetic corpus
    classes: str | None = None
    gt: str | None = None              # folder/prefix of <image_id>.png ground truth
    preset: str | None = None          # None: demo on the built-in corpus, paper on an input
    backbone: str | None = None
    backbone_weights: str | None = None
    cam_checkpoint: str | None = None
    affinity_checkpoint: str | None = None
    train_segmentation: bool = False
    train_images: int = 20000          # the networks train on this many images (a sample by id digest)
    held_out: float = 0.1              # share of the sample the CAM network does not train on (its tag AP)
    shard_rows: int | None = None      # rows per shards/ file (default: the preset's)
    corpus: str | None = None          # the built-in corpus without an input: birds (None) or hard
    synthetic_images: int | None = None  # its size (None: the corpus config's own `num_images`)
    train_workers: int | None = None
    epochs: int | None = None          # override every network's epochs (quick trials, tests)
    crop_size: int | None = None       # override every network's training crop (quick trials, tests)
    scales: tuple[float, ...] | None = None  # override the CAM scales (quick trials, tests)
    use_gpu: bool | None = None        # None: use GPUs if the cluster has them now
    seed: int = 0                      # the synthetic corpus's and every network's training seed


def resolve_preset(job: LabelJob, use_gpu: bool) -> Preset:
    """The preset with the job's overrides (backbone, weights, workers, GPU) applied."""
    name = default_preset(job.preset, demo=job.input is None)
    preset = PRESETS[pretrained_preset(name) if job.backbone_weights else name]
    overrides: dict[str, Any] = {"use_gpu": use_gpu, "seed": job.seed}
    builtin = builtin_weights(job.backbone_weights)
    if builtin and job.backbone and job.backbone != builtin.backbone:
        raise UserError(f"--backbone-weights {job.backbone_weights} are for --backbone {builtin.backbone}, "
                        f"not {job.backbone}")
    backbone = job.backbone or (builtin.backbone if builtin else None)
    if backbone:
        overrides["backbone"] = backbone
    if job.train_workers:
        overrides["num_workers"] = job.train_workers
    if job.epochs:
        overrides["epochs"] = job.epochs
    if job.crop_size:
        overrides["crop_size"] = job.crop_size
    if job.scales:
        preset = replace(preset, cam=replace(preset.cam, scales=tuple(job.scales)))
    if job.shard_rows:
        preset = replace(preset, pipeline=replace(preset.pipeline, shard_rows=job.shard_rows))
    affinity_overrides = {**overrides, "backbone": preset.affinity_backbone} if preset.affinity_backbone else overrides
    return replace(preset,
                   cam_train=replace(preset.cam_train, backbone_weights=job.backbone_weights, **overrides),
                   affinity_train=replace(preset.affinity_train, **affinity_overrides),
                   deeplab_train=replace(preset.deeplab_train, **overrides))


def check_classes(cam_weights: str, class_names: list[str]) -> None:
    """A CAM network must have been trained on the corpus's classes, in the same order."""
    trained = read_meta(cam_weights)["class_names"]
    if list(trained) != list(class_names):
        raise WeightsError(f"{redact(cam_weights)} was trained on classes {trained}, but the corpus has "
                         f"{list(class_names)}; pass the matching --classes or retrain")


def report_rows(records: list[dict[str, Any]], class_names: list[str], gt: str | None) -> list[dict[str, Any]]:
    """Shard records (image_id, image, tag_names, ...) as pipeline rows for the report, their other
    fields kept."""
    corpus = Corpus([CorpusRow(r["image_id"], r["image"], r["tag_names"]) for r in records], class_names)
    return [{**r, **row} for r, row in zip(records, corpus_rows(corpus, gt), strict=True)]


def report_samples(output: str, class_names: list[str], gt: str | None, count: int) -> list[dict[str, Any]]:
    """The first `count` labeled rows of the first shard, as pipeline rows, for the report."""
    shards = list_files(OutputLayout(output).shards, suffix=".parquet")
    if not shards:
        return []
    table = read_table(shards[0], columns=["image_id", "image", "tags"]).slice(0, count)
    records = [{"image_id": r["image_id"], "image": r["image"], "tag_names": r["tags"]} for r in table.to_pylist()]
    return report_rows(records, class_names, gt)


def _count(keys: Any) -> int:
    """How many keys a `committed_keys` ref holds (None: none)."""
    return 0 if keys is None else len(ray.get(keys))


def run(job: LabelJob) -> dict[str, Any]:
    """Run stages A-E (skipping what the output already holds); returns the run summary. The job
    holds the output's lease (`io.lease`) throughout: another job on the same output is refused."""
    run_id = uuid.uuid4().hex[:12]
    with hold(absolute(job.output) or job.output, run_id, "label_dataset"):
        return _run(job, run_id)


def _run(job: LabelJob, run_id: str) -> dict[str, Any]:
    started, timings = time.perf_counter(), {}
    paths: dict[str, Any] = {k: absolute(getattr(job, k)) for k in (
        "output", "input", "gt", "backbone_weights", "cam_checkpoint", "affinity_checkpoint")}
    job = replace(job, **paths)
    out = OutputLayout(job.output)
    if not 0.0 <= job.held_out < 0.5:
        raise UserError(f"--held-out must be in [0, 0.5), got {job.held_out}")
    if job.corpus is not None and (job.input is not None or job.corpus not in CORPORA):
        raise UserError(f"--corpus picks a built-in corpus ({', '.join(CORPORA)}) for a run without "
                        f"--input; got --corpus {job.corpus}" + (f" with --input {job.input}" if job.input else ""))
    check_weights("--backbone-weights", job.backbone_weights)
    check_weights("--cam-checkpoint", job.cam_checkpoint, trained=True)
    check_weights("--affinity-checkpoint", job.affinity_checkpoint, trained=True)
    has_gpu, small = cluster_shape(job.use_gpu)
    preset = resolve_preset(job, use_gpu=has_gpu)
    cpus_per_worker = 0.5 if small else 1.0
    watch_progress()

    def timed(name: str, fn: Callable[..., Any], *args: Any, images: int | None = None, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) as stage `name`, timed; with `images` (to do), a progress line
        every few seconds, counted by the stage's writers (`counter`)."""
        t = time.perf_counter()
        with stage(name), stall_ends_job(name, preset.pipeline, has_gpu):
            if images is None:
                value = fn(*args, **kwargs)
            else:
                with StageProgress(name, images) as progress:
                    value = fn(*args, counter=progress.counter, **kwargs)
        timings[name] = round(time.perf_counter() - t, 2)
        return value

    input_uri, gt = job.input, job.gt
    if input_uri is None:
        corpus_root, kind = out.corpus, job.corpus or "birds"
        size = {} if job.synthetic_images is None else {"num_images": job.synthetic_images}
        input_uri = builtin_corpus(corpus_root, kind, CORPORA[kind](seed=job.seed, **size))
        gt = gt or join(corpus_root, "gt")
    index = timed("corpus", prepare_corpus, input_uri, job.output, job.classes, job.train_images)
    names = list(index.class_names)
    print(f"corpus: {index.num_rows} images, {len(names)} classes, {index.num_errors} rejected rows"
          + (f"; networks train on {index.sample['size']} of them" if index.sample else ""))

    cam_w = job.cam_checkpoint or timed(
        "train_cam", train_stage, "cam", corpus_dataset(index, sample=True, held_out=job.held_out), preset,
        names, job.output, None, cpus_per_worker)[0]
    check_classes(cam_w, names)
    cam_held_out = None
    if job.cam_checkpoint is None and job.held_out > 0:
        cam_held_out = timed("cam_held_out", held_out_ap, index, job.held_out, preset, cam_w, names, has_gpu)
    affinity_w = job.affinity_checkpoint
    if affinity_w is None:
        drop_retried_errors(out.seed_errors)
        seeded = committed_keys(out.seed_index, errors=out.seed_errors)
        timed("seeds", seed_stage, corpus_dataset(index, sample=True, exclude=seeded), preset, cam_w,
              len(names), job.output, has_gpu,
              images=(index.sample["size"] if index.sample else index.num_rows) - _count(seeded))
        rows = corpus_dataset(index, sample=True, include=committed_keys(out.seed_index))
        affinity_w = timed("train_affinity", train_stage, "affinity",
                           rows.map_batches(batch_fn(with_mask_uri), num_cpus=READ_CPUS,
                                            fn_kwargs={"folder": out.seeds}),
                           preset, names, job.output, None if preset.affinity_backbone else Init(cam_w),
                           cpus_per_worker)[0]
    drop_retried_errors(out.errors)
    done = committed_keys(out.shards, errors=out.errors)
    skipped = table_rows(out.shards) + table_rows(out.errors) - index.num_errors
    timed("labels", label_stage, corpus_dataset(index, exclude=done, gt=gt), preset, cam_w, affinity_w,
          len(names), job.output, run_id, has_gpu, evaluate=bool(gt), images=index.num_rows - _count(done))
    metrics = evaluation(job.output, names)
    if metrics:
        write_bytes(out.metrics, json.dumps(metrics, indent=2).encode())

    deeplab_w = None
    if job.train_segmentation:
        labeled = corpus_dataset(index, sample=True, include=committed_keys(out.shards))
        deeplab_w = timed("train_deeplab", train_stage, "deeplab",
                          labeled.map_batches(batch_fn(with_mask_uri), num_cpus=READ_CPUS,
                                              fn_kwargs={"folder": out.labels}),
                          preset, names, job.output, Init(cam_w), cpus_per_worker)[0]

    statistics = label_statistics(job.output, names)
    seeds = seed_statistics(job.output, names)
    warnings = quality_warnings(statistics, seeds)
    labeled_count = table_rows(out.shards)
    errors = table_rows(out.errors)
    summary = {
        "run_id": run_id, "input": input_uri, "output": job.output, "preset": to_dict(preset),
        "job": to_dict(job), "versions": _versions(), "has_gpu": has_gpu,
        "counts": {"input_rows": index.num_rows + index.num_errors, "labeled": labeled_count,
                   "errors": errors, "skipped": skipped, "seed_errors": table_rows(out.seed_errors),
                   "processed": labeled_count + errors - index.num_errors - skipped},
        "train_sample": index.sample or None,
        "checkpoints": {"cam": cam_w, "affinity": affinity_w, "deeplab": deeplab_w},
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 2)},
        "metrics": {v: metrics[v]["miou"] for v in EVAL_VARIANTS if v in metrics} if metrics else None,
        "cam_held_out": cam_held_out, "seed_statistics": seeds, "label_statistics": statistics,
        "warnings": warnings,
    }
    write_bytes(out.run_record, redact(json.dumps(summary, indent=2, default=str)).encode())
    # after run.json, so that a failing picture never loses the run record
    samples = report_samples(job.output, names, gt, 8)
    review = report_rows(review_rows(job.output, REVIEW_ROWS), names, gt)
    summary["report"] = write_report(job.output, samples, preset, cam_w, affinity_w, names, summary,
                                     metrics, review)[-1]
    return {**summary, "metrics_full": metrics}


def held_out_ap(index: CorpusIndex, fraction: float, preset: Preset, cam_weights: str, class_names: list[str],
                has_gpu: bool) -> dict[str, Any] | None:
    """The CAM network's tag AP per class on the training sample's held-out rows (`held_out_rule`),
    kept beside its weights (`held_out.json`) so that a rerun does not score them again."""
    saved = join(posixpath.dirname(cam_weights), "held_out.json")
    if exists(saved):
        kept: dict[str, Any] = json.loads(read_bytes(saved))
        return kept
    rows = corpus_dataset(index, sample=True, held_out=fraction, only_held_out=True)
    decoded = decoded_dataset(rows, num_cpus=preset.pipeline.decode_cpus,
                              max_side=preset.pipeline.max_side).map_batches(keep_decoded)
    result = {**classifier_ap(cam_weights, decoded, class_names, num_cpus=preset.pipeline.gpu_actor_cpus,
                              num_gpus=preset.pipeline.gpu_actor_gpus if has_gpu else 0.0),
              "rule": held_out_rule(fraction)}
    if not result["images"]:
        return None
    write_bytes(saved, json.dumps(result, indent=2).encode())
    return result


def _versions() -> dict[str, str]:
    import pyarrow
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "torchvision": importlib.metadata.version("torchvision"), "numpy": np.__version__,
            "pyarrow": pyarrow.__version__}
