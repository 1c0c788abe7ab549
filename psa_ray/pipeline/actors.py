"""Ray Data actors: thin adapters that load the networks once and call `psa_ray.ops.pseudo_labels`.

Every row is handled on its own: a row that fails gets `error`/`message` set and passes on, so one
bad image never fails the dataset and every input row reaches the writer; but a CUDA error fails
the actor, and a stage whose rows mostly fail stops the job (`row_errors`).
"""
from __future__ import annotations

import sys
import traceback
from dataclasses import replace
from collections.abc import Callable
from typing import Any

import numpy as np

from psa_ray.config import CamConfig, WalkConfig
from psa_ray.io.images import resize_label
from psa_ray.io.palette import decode_label_png, encode_label_png
from psa_ray.io.seeds import encode_seed_scores
from psa_ray.io.storage import read_bytes
from psa_ray.io.redact import redact
from psa_ray.ops.metrics import ground_truth_scores
from psa_ray.ops.pseudo_labels import (
    label_variants, refine_label, seed_crf_scores, seed_label, tagged_cams, walk_scores)
from psa_ray.models.inference import autocast_dtype, input_normalization, load_trained, model_input
from psa_ray.pipeline.readers import object_column
from psa_ray.pipeline.row_errors import ErrorRate, fatal_device_error, free_device_memory, out_of_memory, stage_guard
from psa_ray.train.loop import ray_device
from psa_ray.pipeline.writers import EVAL_VARIANTS, class_fractions, shard_columns, shard_defaults


def per_row(batch: dict[str, np.ndarray], stage: str, fn: Callable[[int], dict[str, Any]],
            columns: dict[str, Any], guard: ErrorRate | None = None) -> dict[str, Any]:
    """Run fn(i) for each row without an error; collect its outputs (defaults for failed rows).

    A CUDA error other than out-of-memory is raised (`row_errors.fatal_device_error`: the actor
    fails and Ray restarts it); every row is counted by the stage's error-rate guard (`guard`,
    default `row_errors.stage_guard(stage)`), which stops the job when most rows fail.
    """
    guard = stage_guard(stage) if guard is None else guard
    n = len(batch["image_id"])
    out: dict[str, list[Any]] = {k: [default] * n for k, default in columns.items()}
    stages, errors, messages = list(batch["stage"]), list(batch["error"]), list(batch["message"])
    for i in range(n):
        if errors[i]:
            continue
        oom = False
        try:
            for key, value in fn(i).items():
                out[key][i] = value
        except Exception as e:  # a bad row must not fail the dataset
            if fatal_device_error(e):
                raise
            oom = out_of_memory(e)
            stages[i], errors[i] = stage, type(e).__name__
            messages[i] = redact(f"{type(e).__name__}: {e}")[:500]
            print(redact(traceback.format_exc()), file=sys.stderr)
        if oom:
            free_device_memory()  # here, after the except block has released the failed call's frames
        guard.record(bool(errors[i]), messages[i])
    result = dict(batch)
    for key, values in out.items():
        result[key] = object_column(values)
    result["stage"], result["error"], result["message"] = map(object_column, (stages, errors, messages))
    return result


def per_batch(batch: dict[str, np.ndarray], stage: str, fn: Callable[[list[int]], list[dict[str, Any]]],
              columns: dict[str, Any], smaller: Callable[[int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """`per_row` for an fn that handles several rows in one call (fn(rows) -> one dict per row).

    All rows without an error go in one call; if it raises, each row is redone alone (smaller
    pieces after an out-of-memory error, the cache freed first), and a row that runs out of
    memory alone is redone by `smaller(i)` (e.g. fewer CAM scales), so that only the rows that
    fail by themselves become error rows. The retries run after the except blocks, which would
    otherwise keep the failed call's tensors alive through its traceback. A CUDA error other than
    out-of-memory is raised (`per_row`).
    """
    rows = [i for i, error in enumerate(batch["error"]) if not error]
    failure, oom = "", False
    try:
        done = dict(zip(rows, fn(rows), strict=True)) if rows else {}
    except Exception as e:  # find the bad rows one by one
        if fatal_device_error(e):
            raise
        failure = f"{type(e).__name__}: {redact(str(e))[:200]}"
        oom = out_of_memory(e)
    if not failure:
        return per_row(batch, stage, done.__getitem__, columns)
    if oom:
        free_device_memory()
    print(f"[{stage}] a batch of {len(rows)} rows failed ({failure}); redoing its rows one by one", file=sys.stderr)
    return per_row(batch, stage, lambda i: _alone(fn, i, smaller, f"[{stage}] {batch['image_id'][i]}"), columns)


def _alone(fn: Callable[[list[int]], list[dict[str, Any]]], i: int,
           smaller: Callable[[int], dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """fn([i])[0]; after an out-of-memory error, `smaller(i)` (outside the except block, the cache freed)."""
    try:
        return fn([i])[0]
    except Exception as e:  # out of memory: retried smaller below
        if smaller is None or not out_of_memory(e):
            raise
    free_device_memory()
    print(f"{name} ran out of memory alone; redoing it smaller", file=sys.stderr)
    return smaller(i)


class NetworkActor:
    """GPU stage, the networks: multi-scale CAMs of the tagged classes (stage B), and for stage D
    AffinityNet and the random walk too, the whole batch at once (`per_batch`)."""

    def __init__(self, cam_weights: str, cam: CamConfig, affinity_weights: str | None = None,
                 walk: WalkConfig | None = None, mixed_precision: bool = True):
        self.device = ray_device()
        self.autocast = autocast_dtype(self.device, mixed_precision)
        self.cam_net = load_trained(cam_weights, self.device)
        self.affinity_net = load_trained(affinity_weights, self.device) if affinity_weights else None
        # an AffinityNet of another backbone (Preset.affinity_backbone) reads the images normalised its own way
        self.affinity_reads_cam_input = (self.affinity_net is None
                                         or input_normalization(self.affinity_net) == input_normalization(self.cam_net))
        self.cam, self.walk = cam, walk or WalkConfig()
        # an image that runs out of memory alone: its CAMs again at the scales up to 1 only
        self.fewer_scales = replace(cam, scales=tuple(s for s in cam.scales if s <= 1.0) or (min(cam.scales),))

    def _rows(self, batch: dict[str, np.ndarray], rows: list[int],
              cam: CamConfig | None = None) -> list[dict[str, Any]]:
        images = [model_input(batch["rgb"][i], self.cam_net) for i in rows]
        tagged = tagged_cams(self.cam_net, images, [batch["tags"][i] for i in rows], cam or self.cam, self.autocast)
        out: list[dict[str, Any]] = [{"class_ids": class_ids, "cams": cams.cpu().numpy().astype(np.float16)}
                                     for class_ids, cams in tagged]
        if self.affinity_net is not None:
            if not self.affinity_reads_cam_input:
                images = [model_input(batch["rgb"][i], self.affinity_net) for i in rows]
            walked = walk_scores(self.affinity_net, images, [cams for _, cams in tagged], self.walk, self.autocast)
            for row, scores in zip(out, walked, strict=True):
                row["walked"] = scores.cpu().numpy()
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        columns: dict[str, np.ndarray] = {"class_ids": np.zeros(0, np.int64), "cams": np.zeros((0, 1, 1), np.float16)}
        if self.affinity_net is not None:
            columns["walked"] = np.zeros((1, 1, 1), np.float32)
        smaller = None if self.fewer_scales == self.cam else lambda i: self._rows(batch, [i], self.fewer_scales)[0]
        return per_batch(batch, "cam" if self.affinity_net is None else "walk",
                         lambda rows: self._rows(batch, rows), columns, smaller)


class StageChain:
    """Several stage actors in one actor: each batch goes through them in turn.

    On a CPU-only cluster every stage runs on the same cores, so one actor per core that does
    them all keeps each core busy and hands no images or score maps from one pool to another.
    stages: (actor class, constructor kwargs) in order.
    """

    def __init__(self, stages: list[tuple[type, dict[str, Any]]]):
        self.stages = [actor(**kwargs) for actor, kwargs in stages]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        for stage in self.stages:
            batch = stage(batch)
        return batch


class SeedActor:
    """CPU stage B: dense CRF at alpha_low / alpha_high -> seed PNG bytes: the CRF scores
    (`cam.seed_scores`, psa) or the confident seed label map (`io.seeds`); and the shares of the
    confident seeds' values (`writers.class_fractions`: background, classes, ignore)."""

    def __init__(self, cam: CamConfig, num_classes: int):
        self.cam, self.num_classes = cam, num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        def row(i: int) -> dict[str, Any]:
            rgb, cams, class_ids = batch["rgb"][i], batch["cams"][i].astype(np.float32), batch["class_ids"][i]
            low, high = seed_crf_scores(rgb, cams, self.cam)
            seeds = seed_label(low, high, class_ids)
            png = encode_seed_scores(low, high, class_ids) if self.cam.seed_scores else encode_label_png(seeds)
            return {"png": png, "seed_fractions": class_fractions(seeds, self.num_classes + 1, ignore=True)}
        out = per_row(batch, "seed", row, {"png": b"", "seed_fractions": np.zeros(self.num_classes + 2, np.float32)})
        return {k: out[k] for k in ("image_id", "image", "tag_names", "png", "seed_fractions", "stage", "error",
                                    "message")}


def ground_truth(uri: str) -> np.ndarray | None:
    """The ground-truth label at uri; None where there is none (no uri, or no such file)."""
    try:
        return decode_label_png(read_bytes(uri)) if uri else None
    except FileNotFoundError:
        return None


class RefineActor:
    """CPU stage D: `ops.pseudo_labels.refine_label` on each walked row (blend, CRF, quality score,
    erased classes restored), the label at the image's full size with the shard columns, and its
    evaluation against the ground truth (`ops.metrics.ground_truth_scores`)."""

    def __init__(self, walk: WalkConfig, seed_alpha: float, num_classes: int, evaluate: bool):
        self.walk, self.seed_alpha = walk, seed_alpha
        self.num_classes, self.evaluate = num_classes, evaluate

    def _row(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        rgb, class_ids = batch["rgb"][i], batch["class_ids"][i]
        cams = batch["cams"][i].astype(np.float32)
        refined = refine_label(rgb, cams, batch["walked"][i], class_ids, self.walk, self.seed_alpha)
        # An image shrunk for processing (PipelineConfig.max_side) gets its label at its full size.
        label = resize_label(refined.label, int(batch["orig_height"][i]), int(batch["orig_width"][i]))
        out = shard_columns(label, refined.confidence, self.num_classes + 1, refined.quality, refined.restored)
        if self.evaluate:
            out.update(self.scores(str(batch["gt_uri"][i]), label, lambda: {
                **label_variants(rgb, cams, refined, class_ids, self.walk.crf), "rw_crf": label}))
        return out

    def scores(self, gt_uri: str, label: np.ndarray, variants: Callable[[], dict[str, np.ndarray]]) -> dict[str, Any]:
        """A labeled row's evaluation columns: `cm_<variant>`, each of `variants()` (labels by
        EVAL_VARIANTS name) against the ground truth at gt_uri; or else `gt_note`, why it was not
        scored (`unreadable`, or a note of `ground_truth_scores`), and `gt_message`. Never raises:
        the label is written and committed whatever its ground truth holds."""
        try:
            gt = ground_truth(gt_uri)
            matrices, note, why = ground_truth_scores(gt, label.shape, variants, self.num_classes + 1)
        except Exception as e:  # a ground-truth problem never costs the label
            matrices, note, why = {}, "unreadable", f"{type(e).__name__}: {e}"
        if note:
            return {"gt_note": note, "gt_message": redact(f"{gt_uri or 'no gt file'}: {why}")[:300]}
        return {f"cm_{name}": cm for name, cm in matrices.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        columns = shard_defaults(self.num_classes + 1)
        if self.evaluate:
            empty = np.zeros(0, np.int64)
            columns.update({f"cm_{v}": empty for v in EVAL_VARIANTS}, gt_note="", gt_message="")
        out = per_row(batch, "crf", lambda i: self._row(batch, i), columns)
        keep = ["image_id", "image", "tag_names", "stage", "error", "message", *columns]
        return {k: out[k] for k in keep}
