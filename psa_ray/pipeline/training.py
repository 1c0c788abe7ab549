"""Training one network on its own (jobs/train_cam.py, train_affinity.py, train_segmentation.py).

The same `stages.train_stage` as the labeling job, on a corpus read into memory (these jobs are
for trying a network out on a few thousand images; the labeling job streams any size).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from psa_ray.config import PRESETS, default_preset
from psa_ray.data.synthetic import SyntheticConfig
from psa_ray.errors import UserError
from psa_ray.io.inputs import read_corpus
from psa_ray.io.keys import is_held_out
from psa_ray.io.lease import hold
from psa_ray.io.storage import absolute
from psa_ray.models.inference import check_weights
from psa_ray.models.networks import network_spec
from psa_ray.pipeline.builtin import builtin_corpus
from psa_ray.pipeline.readers import corpus_rows, decoded_dataset, keep_decoded, rows_dataset, with_masks
from psa_ray.pipeline.stages import train_stage
from psa_ray.pipeline.writers import table_rows
from psa_ray.train.evaluate import classifier_ap
from psa_ray.train.tasks import Init
from psa_ray.pipeline.layout import OutputLayout


@dataclass(frozen=True)
class TrainJob:
    """Options of the train_* jobs (see their --help)."""

    output: str = "outputs/demo"
    input: str | None = None           # manifest or VOC folder; None: the built-in synthetic corpus
    classes: str | None = None
    masks: str | None = None           # AffinityNet/DeepLab targets; None: <output>/<mask_folder>
    init: str | None = None            # initial backbone weights (another network's model.pt)
    preset: str | None = None          # None: demo on the built-in corpus, paper on an input
    backbone: str | None = None
    backbone_weights: str | None = None
    epochs: int | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    val_fraction: float = 0.0          # held-out images (the CAM network's classification mAP)
    synthetic_images: int | None = None  # the built-in corpus's size (None: its config's `num_images`)


def train_network(kind: str, job: TrainJob) -> dict[str, Any]:
    """Train the `kind` network of `job` (connected to Ray); returns its weights URI, image
    counts, last-epoch metrics and, for the CAM network, the held-out mAP. The job holds the
    output's lease (`io.lease`) while it runs: another job writing there is refused."""
    paths: dict[str, Any] = {k: absolute(getattr(job, k)) for k in (  # workers run elsewhere
        "output", "input", "masks", "init", "backbone_weights")}
    job = replace(job, **paths)
    with hold(job.output, uuid.uuid4().hex[:12], f"train_{kind}"):
        return _train_network(kind, job)


def _train_network(kind: str, job: TrainJob) -> dict[str, Any]:
    spec = network_spec(kind)
    check_weights("--backbone-weights", job.backbone_weights)
    check_weights("--init", job.init)
    if not 0.0 <= job.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {job.val_fraction}")
    input_uri = job.input
    if input_uri is None:  # the labeling job's corpus (same defaults), never written over another one
        size: dict[str, Any] = {} if job.synthetic_images is None else {"num_images": job.synthetic_images}
        input_uri = builtin_corpus(OutputLayout(job.output).corpus, "birds", SyntheticConfig(**size))
    corpus, _ = read_corpus(input_uri, classes=job.classes)
    rows = corpus_rows(corpus, None)
    validation = is_held_out([r["image_id"] for r in rows], job.val_fraction)
    train_rows = [r for r, out in zip(rows, validation, strict=True) if not out]
    val_rows = [r for r, out in zip(rows, validation, strict=True) if out]

    preset = PRESETS[default_preset(job.preset, demo=job.input is None)]
    overrides: dict[str, Any] = {k: v for k, v in {"backbone": job.backbone, "backbone_weights": job.backbone_weights,
                                   "epochs": job.epochs, "num_workers": job.workers}.items() if v}
    config = replace(preset.train_config(kind), use_gpu=job.use_gpu, **overrides)
    trained: dict[str, Any] = {f"{kind}_train": config}
    preset = replace(preset, **trained)
    init = None
    if spec.mask_folder:
        train_rows = with_masks(train_rows, job.masks or OutputLayout(job.output).masks(spec.mask_folder))
        init = Init(job.init) if job.init else None
    errors = OutputLayout(job.output).errors
    weights, metrics = train_stage(kind, rows_dataset(train_rows), preset, list(corpus.class_names), job.output,
                                   init, job.cpus_per_worker, errors=errors)
    report: dict[str, Any] = {"weights": weights, "train_images": len(train_rows), "metrics": metrics}
    if spec.mask_folder is None and val_rows:  # a classifier: its mAP on the held-out tags
        held_out = classifier_ap(weights, decoded_dataset(rows_dataset(val_rows)).map_batches(
            keep_decoded, fn_kwargs={"errors": errors}), list(corpus.class_names), num_gpus=1.0 if job.use_gpu else 0.0)
        report.update(val_images=held_out["images"], val_map=held_out["map"], val_ap=held_out["ap"])
    report["failed_images"] = table_rows(errors, "read-")
    return report
