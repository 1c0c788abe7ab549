"""The labeling job's stages on Ray: train a network (A, C, E), seeds (B), labels (D).

Each stage reads what the previous one wrote under the output and writes files named by image
id, so a rerun redoes only what is missing (see `labeling.run`, which strings them together).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import replace
from collections.abc import Iterator
from typing import Any

import ray
from ray.data.exceptions import ExecutionTimeoutError

from psa_ray.config import PipelineConfig, Preset
from psa_ray.errors import UserError
from psa_ray.io.storage import exists
from psa_ray.models.networks import network_spec
from psa_ray.pipeline.actors import NetworkActor, RefineActor, SeedActor, StageChain
from psa_ray.pipeline.datasources import READ_CPUS
from psa_ray.pipeline.ray_types import batch_fn
from psa_ray.pipeline.readers import decoded_dataset, keep_decoded
from psa_ray.pipeline.writers import IndexSink, LabelSink, write_row_files
from psa_ray.train.loop import fit
from psa_ray.train.tasks import Init
from psa_ray.pipeline.layout import OutputLayout

# A commit (one Parquet file per shard_rows rows) is light; asking for other CPUs than the file
# writes keeps Ray from fusing the two, so label files land block by block, not per shard.
COMMIT_CPUS = 0.1

ActorStage = tuple[type, dict[str, Any]]  # an actor class and its constructor's keyword arguments
# How long a stage may make no progress (no block moving through its steps) before the job ends:
# Ray Data's own setting, from its variable (-1: never), else 10 minutes (Ray's default: 30).
NO_PROGRESS_ENV, NO_PROGRESS_S = "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", 600.0


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


def cpu_only_pipeline(p: PipelineConfig, cpus: float) -> PipelineConfig:
    """The pipeline's requests on a CPU-only cluster with `cpus` CPUs now: a fixed pool of one
    `StageChain` actor per CPU (at most `crf_pool[1]`) that leaves a read, a decode, a write and a
    commit room to run beside it.

    Ray Data starts no task that does not fit beside the pool: a pool of every CPU at the paper
    preset's whole-CPU requests left the reads no CPU, and stage B waited forever. Decodes ask
    for READ_CPUS (so that they fuse with the reads), a write for at most that, and each actor for
    its preset's CPUs or its share of what the tasks leave, whichever is less. A cluster without
    a whole CPU yet (autoscaling from zero) keeps the preset's requests, one actor to start with.
    """
    if cpus < 1:
        return replace(p, crf_pool=(1, p.crf_pool[1]))
    size = max(1, min(int(cpus), p.crf_pool[1]))
    left = cpus - READ_CPUS - COMMIT_CPUS  # for the write and the actors
    write = _floor(min(p.write_cpus, READ_CPUS, left / (size + 1)))
    actor = _floor(min(p.crf_actor_cpus, (left - write) / size))
    return replace(p, decode_cpus=READ_CPUS, write_cpus=write, crf_actor_cpus=actor, crf_pool=(size, size))


def gpu_pipeline(p: PipelineConfig, cpus: float) -> PipelineConfig:
    """The pipeline's requests on a cluster with GPUs and `cpus` CPUs now: the preset's where a
    network actor, a CRF actor, a read, a decode, a write and a commit fit in them at once; else
    decodes ask for READ_CPUS (fused with the reads) and the actors and the write for at most
    their share of the rest (on a GPU node of 2 CPUs the paper preset's whole-CPU actors left the
    reads none). A cluster without a whole CPU yet (autoscaling from zero) keeps the preset's."""
    actors = p.gpu_actor_cpus + p.crf_actor_cpus + p.write_cpus
    decode = 0.0 if p.decode_cpus == READ_CPUS else p.decode_cpus  # fused with the reads
    if cpus < 1 or actors + decode + READ_CPUS + COMMIT_CPUS <= cpus:
        return p
    scale = min(1.0, (cpus - READ_CPUS - COMMIT_CPUS) / actors)
    return replace(p, decode_cpus=READ_CPUS, gpu_actor_cpus=_floor(p.gpu_actor_cpus * scale),
                   crf_actor_cpus=_floor(p.crf_actor_cpus * scale), write_cpus=_floor(p.write_cpus * scale))


def _floor(cpus: float) -> float:
    """A CPU request rounded down to a hundredth, so that requests meant to fill a node still fit."""
    return math.floor(cpus * 100) / 100


def actor_stages(ds: ray.data.Dataset, stages: list[ActorStage], p: PipelineConfig,
                 has_gpu: bool) -> ray.data.Dataset:
    """The network stage (`stages[0]`: CAMs, AffinityNet and walk; or DeepLab) then the CPU stage,
    if any (`stages[1]`: CRF), on every batch.

    With GPUs: a GPU actor pool then a CPU actor pool, each grown by the autoscaler for its own
    stage (p: `gpu_pipeline`'s). Without: one pool of `StageChain` actors that run them all (p:
    `cpu_only_pipeline`'s).
    """
    if not has_gpu:
        return ds.map_batches(StageChain, fn_constructor_kwargs={"stages": stages},
                              batch_size=p.batch_size, compute=_pool(p.crf_pool), num_cpus=p.crf_actor_cpus)
    (network, network_kwargs), *cpu_stages = stages
    ds = ds.map_batches(network, fn_constructor_kwargs=network_kwargs, batch_size=p.batch_size,
                        compute=_pool(p.gpu_pool), num_gpus=p.gpu_actor_gpus, num_cpus=p.gpu_actor_cpus)
    for actor, kwargs in cpu_stages:
        ds = ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=p.batch_size,
                            compute=_pool(p.crf_pool), num_cpus=p.crf_actor_cpus)
    return ds


def watch_progress() -> None:
    """Every Dataset built from now on in this process fails with Ray Data's ExecutionTimeoutError
    once it has made no progress for NO_PROGRESS_ENV seconds (default NO_PROGRESS_S)."""
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = float(
        os.environ.get(NO_PROGRESS_ENV, NO_PROGRESS_S))


@contextmanager
def stall_ends_job(stage: str, p: PipelineConfig, has_gpu: bool) -> Iterator[None]:
    """A stage that stopped making progress (`watch_progress`) ends as a UserError: one line naming
    the stage, what its steps ask for, what the cluster has, and the fix."""
    try:
        yield
    except Exception as e:
        if not _timed_out(e):
            raise
        raise UserError(_stall_message(stage, p, has_gpu)) from e


def _stall_message(stage: str, p: PipelineConfig, has_gpu: bool) -> str:
    timeout = ray.data.DataContext.get_current().execution_no_progress_timeout_s
    total, free = ray.cluster_resources(), ray.available_resources()
    if has_gpu:
        p = gpu_pipeline(p, total.get("CPU", 0))
        asks = (f"{p.gpu_pool[0]}-{p.gpu_pool[1]} network actor(s) of {p.gpu_actor_gpus:g} GPU + {p.gpu_actor_cpus:g} "
                f"CPU, {p.crf_pool[0]}-{p.crf_pool[1]} CRF actor(s) of {p.crf_actor_cpus:g} CPU")
    else:
        p = cpu_only_pipeline(p, total.get("CPU", 0))
        asks = f"{p.crf_pool[0]} actor(s) of {p.crf_actor_cpus:g} CPU"
    has = ", ".join(f"{total.get(r, 0):g} {r} ({free.get(r, 0):g} free now)" for r in ("CPU", "GPU"))
    return (f"stage {stage!r} made no progress for {timeout:g} s: it asks for {asks}, reads of {READ_CPUS:g} CPU, "
            f"decodes of {p.decode_cpus:g} and writes of {p.write_cpus:g}; the cluster has {has}. Give it what the "
            f"stage asks for (--use-gpu: a GPU node), or raise {NO_PROGRESS_ENV} (-1: never) if a step is that slow")


def _timed_out(error: BaseException | None) -> bool:
    """Whether Ray Data's ExecutionTimeoutError caused `error` (itself, or down its causes)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ExecutionTimeoutError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__ or getattr(error, "cause", None)
    return False


def is_empty(rows: ray.data.Dataset) -> bool:
    """Whether a stage has nothing to do (reads only until the first row)."""
    first: int = rows.limit(1).count()
    return first == 0


def stage_files(ds: ray.data.Dataset, pipeline: PipelineConfig, stages: list[ActorStage], has_gpu: bool,
                folder: str, column: str, counter: Any = None) -> ray.data.Dataset:
    """Decoded rows through the actor stages (`actor_stages`), then each row's `column` bytes
    written to `<folder>/<image_id>.png` (the rows counted on `counter`, a `progress.RowCounter`):
    the part stages B and D (and prediction) share, before their commit."""
    cpus = ray.cluster_resources().get("CPU", 0)
    p = gpu_pipeline(pipeline, cpus) if has_gpu else cpu_only_pipeline(pipeline, cpus)
    ds = decoded_dataset(ds, num_cpus=p.decode_cpus, max_side=p.max_side)
    ds = actor_stages(ds, stages, p, has_gpu)
    return ds.map_batches(batch_fn(write_row_files), num_cpus=p.write_cpus,
                          fn_kwargs={"folder": folder, "column": column, "counter": counter})


def train_stage(kind: str, rows: ray.data.Dataset, preset: Preset, class_names: list[str],
                output: str, init: Init | None, cpus_per_worker: float,
                errors: str | None = None) -> tuple[str, dict[str, Any]]:
    """Stages A, C, E: train one network on rows (with `mask_uri` for AffinityNet/DeepLab); reuse
    exported weights. Rows that fail to read or decode are left out of training and, with
    `errors` (a folder), recorded there (`readers.keep_decoded`).

    The rows (a few columns each, the training sample) are materialised once; images are read
    and decoded again every epoch. Returns the weights URI and the last epoch's metrics ({} when
    reused).
    """
    weights = OutputLayout(output).weights(kind)
    if exists(weights):
        print(f"[{kind}] reusing {weights}")
        return weights, {}
    rows.context.execution_options.preserve_order = True  # the sample in the same order every run
    rows = rows.materialize()
    num_rows = rows.count()
    if num_rows == 0:
        why = ("no image has a mask (seeds or labels) to learn from" if network_spec(kind).mask_folder
               else "the training sample is empty (too few usable rows, or all held out)")
        raise UserError(f"no images to train the {kind} network on: {why}")
    dataset = decoded_dataset(rows, num_cpus=preset.pipeline.decode_cpus,
                              max_side=preset.pipeline.max_side).map_batches(keep_decoded, fn_kwargs={"errors": errors})
    columns = ["rgb", "tags"] + (["mask"] if network_spec(kind).mask_folder else [])
    weights, metrics = fit(kind, dataset.select_columns(columns), preset.train_config(kind), num_rows=num_rows,
                           class_names=class_names, checkpoints=OutputLayout(output).checkpoints, init=init,
                           radius=preset.walk.radius, cpus_per_worker=cpus_per_worker)
    print(f"[{kind}] trained on {num_rows} images: {json.dumps(metrics, default=str)}")
    return weights, metrics


def seed_stage(rows: ray.data.Dataset, preset: Preset, cam_weights: str, num_classes: int, output: str,
               has_gpu: bool, counter: Any = None) -> None:
    """Stage B: CAMs (GPU pool) -> CRF at two alphas (CPU pool) -> seeds/<id>.png, committed in
    index/seeds/ with each image's tags and seed fractions; the rows that failed in
    index/seed-errors/. rows: those without a committed seed or a final seed error."""
    if is_empty(rows):
        return
    p = preset.pipeline
    ds = stage_files(rows, p, [(NetworkActor, dict(cam_weights=cam_weights, cam=preset.cam,
                                                   mixed_precision=p.mixed_precision)),
                               (SeedActor, {"cam": preset.cam, "num_classes": num_classes})], has_gpu,
                     OutputLayout(output).seeds, "png", counter)
    ds.write_datasink(IndexSink(OutputLayout(output).seed_index, p.shard_rows, with_seed_fractions=True,
                                errors_uri=OutputLayout(output).seed_errors), ray_remote_args={"num_cpus": COMMIT_CPUS})


def label_stage(rows: ray.data.Dataset, preset: Preset, cam_weights: str, affinity_weights: str,
                num_classes: int, output: str, run_id: str, has_gpu: bool, evaluate: bool,
                counter: Any = None) -> None:
    """Stage D: CAM -> AffinityNet -> random walk (GPU pool) -> CRF (CPU pool) -> labels/, then
    shards/ (and eval/, errors/) committed thousands of rows at a time. rows: those not yet
    committed; evaluate: score rows whose `gt_uri` file exists."""
    if is_empty(rows):
        return
    p = preset.pipeline
    ds = stage_files(rows, p, [(NetworkActor, dict(cam_weights=cam_weights, cam=preset.cam,
                                                   affinity_weights=affinity_weights, walk=preset.walk,
                                                   mixed_precision=p.mixed_precision)),
                               (RefineActor, dict(walk=preset.walk, seed_alpha=preset.cam.alpha_low,
                                                  num_classes=num_classes, evaluate=evaluate))],
                     has_gpu, OutputLayout(output).labels, "label_png", counter)
    ds.write_datasink(LabelSink(output, run_id, evaluate, p.shard_rows), ray_remote_args={"num_cpus": COMMIT_CPUS})
