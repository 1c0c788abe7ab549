"""The whole labeling job (design.md section 1): stages A-E over one output location.

Each stage reads what the previous one wrote under the output, so a rerun resumes: a trained
network's exported weights skip its training, existing seeds are not recomputed, and committed
labels are not relabeled.
"""
from __future__ import annotations

import json
import platform
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import torch

from psa_ray.config import PRESETS, Preset, to_dict
from psa_ray.data.synthetic import SyntheticConfig, write_corpus
from psa_ray.io.manifest import Corpus, read_corpus
from psa_ray.io.storage import absolute, exists, join, list_files, redact, write_bytes
from psa_ray.ops.metrics import iou_per_class
from psa_ray.pipeline.actors import CamActor, RefineActor, SeedActor, StageChain
from psa_ray.pipeline.report import write_report
from psa_ray.pipeline.readers import decoded_dataset, drop_failed
from psa_ray.pipeline.writers import (
    EVAL_VARIANTS, LabelSink, PngSink, done_ids, error_table, read_tables, write_table)
from psa_ray.models.inference import read_meta
from psa_ray.train.loop import fit


@dataclass
class LabelJob:
    """Options of `jobs/label_dataset.py` (see its --help)."""

    output: str
    input: str | None = None           # manifest or VOC folder; None = built-in synthetic corpus
    classes: str | None = None
    gt: str | None = None              # folder/prefix of <image_id>.png ground truth
    preset: str = "demo"
    backbone: str | None = None
    backbone_weights: str | None = None
    cam_checkpoint: str | None = None
    affinity_checkpoint: str | None = None
    train_segmentation: bool = False
    synthetic_images: int = 300
    train_workers: int | None = None
    epochs: int | None = None          # override every network's epochs (quick trials, tests)
    crop_size: int | None = None       # override every network's training crop (quick trials, tests)
    scales: tuple[float, ...] | None = None  # override the CAM scales (quick trials, tests)
    use_gpu: bool | None = None        # None: use GPUs if the cluster has them now
    seed: int = 0


def resolve_preset(job: LabelJob, use_gpu: bool) -> Preset:
    """The preset with the job's overrides (backbone, weights, workers, GPU) applied."""
    preset = PRESETS[job.preset]
    overrides: dict[str, Any] = {"use_gpu": use_gpu}
    if job.backbone:
        overrides["backbone"] = job.backbone
    if job.train_workers:
        overrides["num_workers"] = job.train_workers
    if job.epochs:
        overrides["epochs"] = job.epochs
    if job.crop_size:
        overrides["crop_size"] = job.crop_size
    if job.scales:
        preset = replace(preset, cam=replace(preset.cam, scales=tuple(job.scales)))
    return replace(preset,
                   cam_train=replace(preset.cam_train, backbone_weights=job.backbone_weights, **overrides),
                   affinity_train=replace(preset.affinity_train, **overrides),
                   deeplab_train=replace(preset.deeplab_train, **overrides))


def cluster_shape(use_gpu: bool | None) -> tuple[bool, bool]:
    """(use GPUs, small CPU-only cluster) for a run. use_gpu None: GPUs if the cluster has some
    now; an autoscaling cluster may have no GPU node yet, so --use-gpu asks for them regardless."""
    resources = ray.cluster_resources()
    has_gpu = use_gpu if use_gpu is not None else resources.get("GPU", 0) > 0
    return has_gpu, resources.get("CPU", 1) < 4 and not has_gpu


def corpus_rows(corpus: Corpus, gt: str | None) -> list[dict[str, Any]]:
    """Corpus rows as pipeline rows: multi-hot `tags`, `tag_names` ('|'-joined, as in CSV
    manifests: a flat string column keeps Ray's blocks in Arrow), and `gt_uri` ('' if none)."""
    gt_files = set(list_files(gt, suffix=".png")) if gt else set()
    rows = []
    for row in corpus.rows:
        gt_uri = join(gt, f"{row.image_id}.png") if gt else ""
        rows.append({"image_id": row.image_id, "image": row.image, "tag_names": "|".join(row.tags),
                     "tags": corpus.tag_vector(row), "gt_uri": gt_uri if gt_uri in gt_files else ""})
    return rows


def with_masks(rows: list[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    """The rows that have `<folder>/<image_id>.png` (seeds, labels or true masks), with `mask_uri`."""
    have = set(list_files(folder, suffix=".png"))
    return [{**r, "mask_uri": uri} for r in rows if (uri := join(folder, f"{r['image_id']}.png")) in have]


def _pool(sizes: tuple[int, int]) -> ray.data.ActorPoolStrategy:
    # Surviving a lost node (or an OOM-killed actor) relies on Ray Data's defaults, kept on
    # purpose: pool actors get max_restarts=-1 and max_task_retries=-1 (a dead actor restarts on
    # a live node and redoes its batches), tasks such as the writes get max_retries=-1 for system
    # errors, and lost blocks are rebuilt from lineage. Redoing work is safe because the sinks
    # name every file by image id. User errors are not retried (the actors turn them into error
    # rows) and DataContext.max_errored_blocks stays 0, so no block is ever dropped. The defaults
    # are not restated here: map_batches takes them only through **ray_remote_args, which Ray
    # 2.60 deprecates (removal in 2.64). tests/test_faults.py kills a worker node in stage D.
    return ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1])


def actor_stages(ds: ray.data.Dataset, network_stage: tuple[type, dict[str, Any]],
                 cpu_stage: tuple[type, dict[str, Any]], preset: Preset, has_gpu: bool) -> ray.data.Dataset:
    """The network stage (CAMs, AffinityNet, walk) then the CPU stage (CRF) on every batch.

    With GPUs: a GPU actor pool then a CPU actor pool, each grown by the autoscaler for its own
    stage. Without: one pool of `StageChain` actors that run both, as many as the cluster has
    cores for now (one torch thread each) and up to the CRF pool's maximum.
    """
    p = preset.pipeline
    if has_gpu:
        ds = ds.map_batches(network_stage[0], fn_constructor_kwargs=network_stage[1], batch_size=p.batch_size,
                            compute=_pool(p.gpu_pool), num_gpus=p.gpu_actor_gpus, num_cpus=p.gpu_actor_cpus)
        return ds.map_batches(cpu_stage[0], fn_constructor_kwargs=cpu_stage[1], batch_size=p.batch_size,
                              compute=_pool(p.crf_pool), num_cpus=p.crf_actor_cpus)
    cores = int(ray.cluster_resources().get("CPU", 1) // max(1.0, p.crf_actor_cpus))
    size = max(1, min(cores, p.crf_pool[1]))
    return ds.map_batches(StageChain, fn_constructor_kwargs={"stages": [network_stage, cpu_stage]},
                          batch_size=p.batch_size, compute=_pool((size, max(size, p.crf_pool[1]))),
                          num_cpus=p.crf_actor_cpus)


def train_stage(kind: str, rows: list[dict[str, Any]], preset: Preset, class_names: list[str],
                output: str, init: dict[str, Any] | None, cpus_per_worker: float) -> tuple[str, dict]:
    """Train one network on rows (with `mask_uri` for AffinityNet/DeepLab); reuse exported weights.

    Returns the weights URI and the last epoch's metrics ({} when reused).
    """
    weights = join(output, "checkpoints", kind, "model.pt")
    if exists(weights):
        print(f"[{kind}] reusing {weights}")
        return weights, {}
    config = {"cam": preset.cam_train, "affinity": preset.affinity_train,
              "deeplab": preset.deeplab_train}[kind]
    dataset = decoded_dataset(rows, num_cpus=preset.pipeline.decode_cpus,
                              max_side=preset.pipeline.max_side).map_batches(drop_failed)
    columns = ["rgb", "tags"] + (["mask"] if kind != "cam" else [])
    weights, metrics = fit(kind, dataset.select_columns(columns), config, num_rows=len(rows),
                           class_names=class_names, output_uri=output, init=init,
                           radius=preset.walk.radius, cpus_per_worker=cpus_per_worker)
    print(f"[{kind}] trained: {json.dumps(metrics, default=str)}")
    return weights, metrics


def seed_stage(rows: list[dict[str, Any]], preset: Preset, cam_weights: str, output: str,
               has_gpu: bool) -> int:
    """Stage B: CAMs (GPU pool) -> CRF at two alphas (CPU pool) -> seeds/<id>.png; returns count."""
    folder = join(output, "seeds")
    have = {u.rsplit("/", 1)[-1][: -len(".png")] for u in list_files(folder, suffix=".png")}
    todo = [r for r in rows if r["image_id"] not in have]
    if todo:
        p = preset.pipeline
        ds = decoded_dataset(todo, num_cpus=p.decode_cpus, max_side=p.max_side)
        ds = actor_stages(ds, (CamActor, dict(cam_weights=cam_weights, cam=preset.cam,
                                              mixed_precision=p.mixed_precision)),
                          (SeedActor, {"cam": preset.cam}), preset, has_gpu)
        ds.write_datasink(PngSink(folder), ray_remote_args={"num_cpus": p.write_cpus})
    return len(have) + len(todo)


def label_stage(rows: list[dict[str, Any]], preset: Preset, cam_weights: str, affinity_weights: str,
                num_classes: int, output: str, run_id: str, has_gpu: bool) -> dict[str, int]:
    """Stage D: CAM -> AffinityNet -> random walk (GPU pool) -> CRF (CPU pool) -> labels/shards."""
    done = done_ids(output)
    todo = [r for r in rows if r["image_id"] not in done]
    evaluate = any(r["gt_uri"] for r in rows)
    if todo:
        p = preset.pipeline
        ds = decoded_dataset(todo, num_cpus=p.decode_cpus, max_side=p.max_side)
        ds = actor_stages(ds, (CamActor, dict(cam_weights=cam_weights, cam=preset.cam,
                                              affinity_weights=affinity_weights, walk=preset.walk,
                                              keep_cams=evaluate, mixed_precision=p.mixed_precision)),
                          (RefineActor, dict(walk=preset.walk, num_classes=num_classes, evaluate=evaluate)),
                          preset, has_gpu)
        ds.write_datasink(LabelSink(output, run_id, evaluate), ray_remote_args={"num_cpus": p.write_cpus})
    return {"skipped": len(done & {r["image_id"] for r in rows}), "processed": len(todo)}


def check_classes(cam_weights: str, class_names: list[str]) -> None:
    """A CAM network must have been trained on the corpus's classes, in the same order."""
    trained = read_meta(cam_weights)["class_names"]
    if list(trained) != list(class_names):
        raise ValueError(f"{redact(cam_weights)} was trained on classes {trained}, but the corpus has "
                         f"{list(class_names)}; pass the matching --classes or retrain")


def evaluation(output: str, class_names: list[str]) -> dict[str, Any] | None:
    """metrics.json content from eval/ (one row per labeled image with ground truth)."""
    table = read_tables(join(output, "eval"))
    if table is None:
        return None
    k = len(class_names) + 1
    rows = {r["image_id"]: r for r in table.to_pylist()}  # a rerun may have re-evaluated an image
    metrics: dict[str, Any] = {"class_names": ["background", *class_names], "images": len(rows)}
    for variant in EVAL_VARIANTS:
        if any(r.get(f"cm_{variant}") is None for r in rows.values()):
            continue  # eval rows of an older run lack a newer variant (e.g. "psa")
        cm = sum(np.asarray(r[f"cm_{variant}"], np.int64).reshape(k, k) for r in rows.values())
        iou = iou_per_class(cm)
        metrics[variant] = {"miou": float(np.nanmean(iou)),
                            "iou": [None if np.isnan(v) else float(v) for v in iou]}
    return metrics


def metrics_table(metrics: dict[str, Any]) -> str:
    """The per-class IoU table (percent) printed at the end of a run."""
    names = metrics["class_names"]
    variants = [v for v in EVAL_VARIANTS if v in metrics]
    width = max(len(n) for n in [*names, "mIoU"]) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{v:>9}" for v in variants)]
    for i, name in enumerate(names):
        cells = [metrics[v]["iou"][i] for v in variants]
        lines.append(f"{name:<{width}}" + "".join("      n/a" if c is None else f"{100 * c:9.1f}" for c in cells))
    lines.append(f"{'mIoU':<{width}}" + "".join(f"{100 * metrics[v]['miou']:9.1f}" for v in variants))
    return "\n".join(lines)


def run(job: LabelJob) -> dict[str, Any]:
    """Run stages A-E (skipping what the output already holds); returns the run summary."""
    started, timings = time.perf_counter(), {}
    run_id = uuid.uuid4().hex[:12]
    job = replace(job, **{k: absolute(getattr(job, k)) for k in (
        "output", "input", "gt", "backbone_weights", "cam_checkpoint", "affinity_checkpoint")})
    has_gpu, small = cluster_shape(job.use_gpu)
    preset = resolve_preset(job, use_gpu=has_gpu)
    cpus_per_worker = 0.5 if small else 1.0

    input_uri, gt = job.input, job.gt
    if input_uri is None:
        corpus_root = join(job.output, "corpus")
        input_uri = join(corpus_root, "manifest.parquet")
        if not exists(input_uri):
            write_corpus(corpus_root, SyntheticConfig(num_images=job.synthetic_images, seed=job.seed))
        gt = gt or join(corpus_root, "gt")
    corpus, row_errors = read_corpus(input_uri, classes=job.classes)
    if row_errors:
        write_table(join(job.output, "errors", "manifest.parquet"),
                    error_table([e.to_dict() for e in row_errors]))
    rows = corpus_rows(corpus, gt)
    names = list(corpus.class_names)
    print(f"corpus: {len(rows)} images, {len(names)} classes, {len(row_errors)} rejected rows")

    def timed(name, fn, *args, **kwargs):
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t, 2)
        return value

    cam_w = job.cam_checkpoint or timed(
        "train_cam", train_stage, "cam", rows, preset, names, job.output, None, cpus_per_worker)[0]
    check_classes(cam_w, names)
    affinity_w = job.affinity_checkpoint
    if affinity_w is None:
        timed("seeds", seed_stage, rows, preset, cam_w, job.output, has_gpu)
        seeded = with_masks(rows, join(job.output, "seeds"))
        affinity_w = timed("train_affinity", train_stage, "affinity", seeded, preset, names, job.output,
                           {"uri": cam_w, "backbone_only": True}, cpus_per_worker)[0]
    counts = timed("labels", label_stage, rows, preset, cam_w, affinity_w, len(names), job.output,
                   run_id, has_gpu)
    metrics = evaluation(job.output, names)
    if metrics:
        write_bytes(join(job.output, "metrics.json"), json.dumps(metrics, indent=2).encode())

    deeplab_w = None
    if job.train_segmentation:
        labeled = with_masks(rows, join(job.output, "labels"))
        deeplab_w = timed("train_deeplab", train_stage, "deeplab", labeled, preset, names, job.output,
                          {"uri": cam_w, "backbone_only": True}, cpus_per_worker)[0]

    labeled = len(list_files(join(job.output, "labels"), suffix=".png"))
    errors = read_tables(join(job.output, "errors"), columns=["image_id"])
    summary = {
        "run_id": run_id, "input": input_uri, "output": job.output, "preset": to_dict(preset),
        "job": to_dict(job), "versions": _versions(), "has_gpu": has_gpu,
        "counts": {"input_rows": len(rows) + len(row_errors), "labeled": labeled,
                   "errors": 0 if errors is None else errors.num_rows, **counts},
        "checkpoints": {"cam": cam_w, "affinity": affinity_w, "deeplab": deeplab_w},
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 2)},
        "metrics": {v: metrics[v]["miou"] for v in EVAL_VARIANTS if v in metrics} if metrics else None,
    }
    write_bytes(join(job.output, "run.json"), redact(json.dumps(summary, indent=2, default=str)).encode())
    # after run.json, so that a failing picture never loses the run record
    summary["report"] = write_report(job.output, rows, preset, cam_w, affinity_w, names, metrics)[-1]
    return {**summary, "metrics_full": metrics}


def _versions() -> dict[str, str]:
    import pyarrow
    import torchvision
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__}
