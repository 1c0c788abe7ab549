"""The whole labeling job (design.md section 1): stages A-E over one output location.

Each stage reads what the previous one wrote under the output, so a rerun resumes: a trained
network's exported weights skip its training, existing seeds are not recomputed, and committed
labels are not relabeled.
"""
from __future__ import annotations

import importlib.metadata
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
from psa_ray.io.manifest import Corpus, CorpusRow
from psa_ray.io.storage import absolute, exists, join, list_files, redact, write_bytes
from psa_ray.ops.metrics import iou_per_class
from psa_ray.pipeline.actors import CamActor, RefineActor, SeedActor, StageChain
from psa_ray.pipeline.corpus import READ_CPUS, committed_keys, corpus_dataset, prepare_corpus
from psa_ray.pipeline.report import write_report
from psa_ray.pipeline.readers import decoded_dataset, drop_failed
from psa_ray.pipeline.writers import (
    EVAL_VARIANTS, IndexSink, LabelSink, read_table, table_rows, write_row_files)
from psa_ray.models.inference import read_meta
from psa_ray.models.weights import WeightsError
from psa_ray.train.loop import fit

# A commit (one Parquet file per shard_rows rows) is light; asking for other CPUs than the file
# writes keeps Ray from fusing the two, so label files land block by block, not per shard.
COMMIT_CPUS = 0.1
SEED_INDEX = "index/seeds"  # committed seeds: <output>/index/seeds/<digest>.parquet (image_id)


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
    train_images: int = 20000          # the networks train on this many images (a sample by id digest)
    shard_rows: int | None = None      # rows per shards/ file (default: the preset's)
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
    if job.shard_rows:
        preset = replace(preset, pipeline=replace(preset.pipeline, shard_rows=job.shard_rows))
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
    """A small in-memory corpus (tests, benchmarks, the train_* CLIs) as pipeline rows, the
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


def _with_mask_uri(batch: dict[str, np.ndarray], *, folder: str) -> dict[str, np.ndarray]:
    return {**batch, "mask_uri": np.array([join(folder, f"{i}.png") for i in batch["image_id"]], dtype=object)}


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


def is_empty(rows: ray.data.Dataset) -> bool:
    """Whether a stage has nothing to do (reads only until the first row)."""
    return rows.limit(1).count() == 0


def train_stage(kind: str, rows: ray.data.Dataset, preset: Preset, class_names: list[str],
                output: str, init: dict[str, Any] | None, cpus_per_worker: float) -> tuple[str, dict]:
    """Train one network on rows (with `mask_uri` for AffinityNet/DeepLab); reuse exported weights.

    The rows (a few columns each, the training sample) are materialised once; images are read
    and decoded again every epoch. Returns the weights URI and the last epoch's metrics ({} when
    reused).
    """
    weights = join(output, "checkpoints", kind, "model.pt")
    if exists(weights):
        print(f"[{kind}] reusing {weights}")
        return weights, {}
    config = {"cam": preset.cam_train, "affinity": preset.affinity_train,
              "deeplab": preset.deeplab_train}[kind]
    rows = rows.materialize()
    num_rows = rows.count()
    if num_rows == 0:
        raise ValueError(f"no images to train the {kind} network on")
    dataset = decoded_dataset(rows, num_cpus=preset.pipeline.decode_cpus,
                              max_side=preset.pipeline.max_side).map_batches(drop_failed)
    columns = ["rgb", "tags"] + (["mask"] if kind != "cam" else [])
    weights, metrics = fit(kind, dataset.select_columns(columns), config, num_rows=num_rows,
                           class_names=class_names, output_uri=output, init=init,
                           radius=preset.walk.radius, cpus_per_worker=cpus_per_worker)
    print(f"[{kind}] trained on {num_rows} images: {json.dumps(metrics, default=str)}")
    return weights, metrics


def seed_stage(rows: ray.data.Dataset, preset: Preset, cam_weights: str, output: str,
               has_gpu: bool) -> None:
    """Stage B: CAMs (GPU pool) -> CRF at two alphas (CPU pool) -> seeds/<id>.png, committed in
    index/seeds/. rows: those without a committed seed."""
    if is_empty(rows):
        return
    p = preset.pipeline
    ds = decoded_dataset(rows, num_cpus=p.decode_cpus, max_side=p.max_side)
    ds = actor_stages(ds, (CamActor, dict(cam_weights=cam_weights, cam=preset.cam,
                                          mixed_precision=p.mixed_precision)),
                      (SeedActor, {"cam": preset.cam}), preset, has_gpu)
    ds = ds.map_batches(write_row_files, num_cpus=p.write_cpus,
                        fn_kwargs={"folder": join(output, "seeds"), "column": "png"})
    ds.write_datasink(IndexSink(join(output, SEED_INDEX), p.shard_rows), ray_remote_args={"num_cpus": COMMIT_CPUS})


def label_stage(rows: ray.data.Dataset, preset: Preset, cam_weights: str, affinity_weights: str,
                num_classes: int, output: str, run_id: str, has_gpu: bool, evaluate: bool) -> None:
    """Stage D: CAM -> AffinityNet -> random walk (GPU pool) -> CRF (CPU pool) -> labels/, then
    shards/ (and eval/, errors/) committed thousands of rows at a time. rows: those not yet
    committed; evaluate: score rows whose `gt_uri` file exists."""
    if is_empty(rows):
        return
    p = preset.pipeline
    ds = decoded_dataset(rows, num_cpus=p.decode_cpus, max_side=p.max_side)
    ds = actor_stages(ds, (CamActor, dict(cam_weights=cam_weights, cam=preset.cam,
                                          affinity_weights=affinity_weights, walk=preset.walk,
                                          keep_cams=evaluate, mixed_precision=p.mixed_precision)),
                      (RefineActor, dict(walk=preset.walk, num_classes=num_classes, evaluate=evaluate)),
                      preset, has_gpu)
    ds = ds.map_batches(write_row_files, num_cpus=p.write_cpus,
                        fn_kwargs={"folder": join(output, "labels"), "column": "label_png"})
    ds.write_datasink(LabelSink(output, run_id, evaluate, p.shard_rows), ray_remote_args={"num_cpus": COMMIT_CPUS})


def check_classes(cam_weights: str, class_names: list[str]) -> None:
    """A CAM network must have been trained on the corpus's classes, in the same order."""
    trained = read_meta(cam_weights)["class_names"]
    if list(trained) != list(class_names):
        raise WeightsError(f"{redact(cam_weights)} was trained on classes {trained}, but the corpus has "
                         f"{list(class_names)}; pass the matching --classes or retrain")


def evaluation(output: str, class_names: list[str]) -> dict[str, Any] | None:
    """metrics.json content from eval/: the confusion matrices summed over the eval files whose
    shard is committed (an eval file without its shard belongs to an interrupted write)."""
    shards = {u.rsplit("/", 1)[-1] for u in list_files(join(output, "shards"), suffix=".parquet")}
    k = len(class_names) + 1
    sums: dict[str, np.ndarray | None] = {v: np.zeros((k, k), np.int64) for v in EVAL_VARIANTS}
    images = 0
    for uri in list_files(join(output, "eval"), suffix=".parquet"):
        if uri.rsplit("/", 1)[-1] not in shards:
            continue
        row = read_table(uri).to_pylist()[0]
        images += row["images"]
        for v in EVAL_VARIANTS:
            if row.get(f"cm_{v}") is None:
                sums[v] = None  # written before the variant existed: not scored
            elif sums[v] is not None:
                sums[v] += np.asarray(row[f"cm_{v}"], np.int64).reshape(k, k)
    if not images:
        return None
    metrics: dict[str, Any] = {"class_names": ["background", *class_names], "images": images}
    for variant in EVAL_VARIANTS:
        if sums[variant] is None:
            continue  # eval files of an older run lack a newer variant (e.g. "psa")
        iou = iou_per_class(sums[variant])
        metrics[variant] = {"miou": float(np.nanmean(iou)),
                            "iou": [None if np.isnan(v) else float(v) for v in iou]}
    return metrics


def report_samples(output: str, class_names: list[str], gt: str | None, count: int) -> list[dict[str, Any]]:
    """The first `count` labeled rows of the first shard, as pipeline rows, for the report."""
    shards = list_files(join(output, "shards"), suffix=".parquet")
    if not shards:
        return []
    table = read_table(shards[0], columns=["image_id", "image", "tags"]).slice(0, count)
    corpus = Corpus([CorpusRow(r["image_id"], r["image"], r["tags"]) for r in table.to_pylist()], class_names)
    return corpus_rows(corpus, gt)


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
    for option, uri in (("--backbone-weights", job.backbone_weights), ("--cam-checkpoint", job.cam_checkpoint),
                        ("--affinity-checkpoint", job.affinity_checkpoint)):
        if uri and not exists(uri):
            raise WeightsError(f"{option} {uri}: not found")
    if job.affinity_checkpoint:
        read_meta(job.affinity_checkpoint)  # a WeightsError now, not in a worker later
    has_gpu, small = cluster_shape(job.use_gpu)
    preset = resolve_preset(job, use_gpu=has_gpu)
    cpus_per_worker = 0.5 if small else 1.0

    def timed(name, fn, *args, **kwargs):
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t, 2)
        return value

    input_uri, gt = job.input, job.gt
    if input_uri is None:
        corpus_root = join(job.output, "corpus")
        input_uri = join(corpus_root, "manifest.parquet")
        if not exists(input_uri):
            write_corpus(corpus_root, SyntheticConfig(num_images=job.synthetic_images, seed=job.seed))
        gt = gt or join(corpus_root, "gt")
    index = timed("corpus", prepare_corpus, input_uri, job.output, job.classes, job.train_images)
    names = list(index.class_names)
    print(f"corpus: {index.num_rows} images, {len(names)} classes, {index.num_errors} rejected rows"
          + (f"; networks train on {index.sample['size']} of them" if index.sample else ""))

    cam_w = job.cam_checkpoint or timed(
        "train_cam", train_stage, "cam", corpus_dataset(index, sample=True), preset, names, job.output,
        None, cpus_per_worker)[0]
    check_classes(cam_w, names)
    affinity_w = job.affinity_checkpoint
    if affinity_w is None:
        seeded = committed_keys(join(job.output, SEED_INDEX))
        timed("seeds", seed_stage, corpus_dataset(index, sample=True, exclude=seeded), preset, cam_w,
              job.output, has_gpu)
        rows = corpus_dataset(index, sample=True, include=committed_keys(join(job.output, SEED_INDEX)))
        affinity_w = timed("train_affinity", train_stage, "affinity",
                           rows.map_batches(_with_mask_uri, num_cpus=READ_CPUS,
                                            fn_kwargs={"folder": join(job.output, "seeds")}),
                           preset, names, job.output, {"uri": cam_w, "backbone_only": True}, cpus_per_worker)[0]
    done = committed_keys(join(job.output, "shards"), errors=join(job.output, "errors"))
    skipped = table_rows(join(job.output, "shards")) + table_rows(join(job.output, "errors")) - index.num_errors
    timed("labels", label_stage, corpus_dataset(index, exclude=done, gt=gt), preset, cam_w, affinity_w,
          len(names), job.output, run_id, has_gpu, evaluate=bool(gt))
    metrics = evaluation(job.output, names)
    if metrics:
        write_bytes(join(job.output, "metrics.json"), json.dumps(metrics, indent=2).encode())

    deeplab_w = None
    if job.train_segmentation:
        labeled = corpus_dataset(index, sample=True, include=committed_keys(join(job.output, "shards")))
        deeplab_w = timed("train_deeplab", train_stage, "deeplab",
                          labeled.map_batches(_with_mask_uri, num_cpus=READ_CPUS,
                                              fn_kwargs={"folder": join(job.output, "labels")}),
                          preset, names, job.output, {"uri": cam_w, "backbone_only": True}, cpus_per_worker)[0]

    labeled_count = table_rows(join(job.output, "shards"))
    errors = table_rows(join(job.output, "errors"))
    summary = {
        "run_id": run_id, "input": input_uri, "output": job.output, "preset": to_dict(preset),
        "job": to_dict(job), "versions": _versions(), "has_gpu": has_gpu,
        "counts": {"input_rows": index.num_rows + index.num_errors, "labeled": labeled_count,
                   "errors": errors, "skipped": skipped,
                   "processed": labeled_count + errors - index.num_errors - skipped},
        "train_sample": index.sample or None,
        "checkpoints": {"cam": cam_w, "affinity": affinity_w, "deeplab": deeplab_w},
        "timings_s": {**timings, "total": round(time.perf_counter() - started, 2)},
        "metrics": {v: metrics[v]["miou"] for v in EVAL_VARIANTS if v in metrics} if metrics else None,
    }
    write_bytes(join(job.output, "run.json"), redact(json.dumps(summary, indent=2, default=str)).encode())
    # after run.json, so that a failing picture never loses the run record
    samples = report_samples(job.output, names, gt, 8)
    summary["report"] = write_report(job.output, samples, preset, cam_w, affinity_w, names, metrics)[-1]
    return {**summary, "metrics_full": metrics}


def _versions() -> dict[str, str]:
    import pyarrow
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "torchvision": importlib.metadata.version("torchvision"), "numpy": np.__version__,
            "pyarrow": pyarrow.__version__}
