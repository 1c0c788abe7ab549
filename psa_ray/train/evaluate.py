"""Evaluation of trained networks on held-out rows."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from psa_ray.models.inference import load_trained, model_input, read_meta
from psa_ray.ops.metrics import average_precision
from psa_ray.train.loop import ray_device


def training_size(height: int, width: int, resize_long: Sequence[int] | None) -> tuple[int, int]:
    """(height, width) resized so that the long side is the middle of the training's `resize_long`
    range (None: as it is): the scale the network learnt the tags at. Its CAMs may be computed
    larger (`CamConfig.min_side`), where a classifier trained small tells the tags less well."""
    if resize_long is None:
        return height, width
    scale = (resize_long[0] + resize_long[1]) / 2 / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class TagScores:
    """Ray Data actor: a CAM network's tag probabilities [C] of each decoded row, the sigmoid of its
    logits for the whole image as the network learnt to classify it (`training_size`)."""

    def __init__(self, weights_uri: str):
        self.device = ray_device()
        self.model = load_trained(weights_uri, self.device)
        self.resize_long = read_meta(weights_uri).get("train", {}).get("resize_long")

    def _scores(self, rgb: np.ndarray) -> np.ndarray:
        image = model_input(rgb, self.model)[None]
        height, width = rgb.shape[:2]
        size = training_size(height, width, self.resize_long)
        if size != rgb.shape[:2]:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        scores: np.ndarray = torch.sigmoid(self.model(image))[0].float().cpu().numpy()
        return scores

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            scores = [self._scores(rgb) for rgb in batch["rgb"]]
        return {"scores": np.stack(scores), "tags": np.stack([np.asarray(t, np.float32) for t in batch["tags"]])}


def classifier_ap(weights_uri: str, dataset: ray.data.Dataset, class_names: list[str],
                  num_cpus: float = 0.5, num_gpus: float = 0.0) -> dict[str, Any]:
    """Classification AP of a CAM network over decoded rows (`rgb`, multi-hot `tags`), run in one
    Ray actor: {"images", "map", "ap": {class: AP or None (no positive)}}. The driver holds the
    scores of these rows only (a held-out share of the training sample)."""
    scored = dataset.map_batches(TagScores, fn_constructor_kwargs={"weights_uri": weights_uri},
                                 batch_size=16,
                                 compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, num_gpus=num_gpus)
    scores, targets = [], []
    for batch in scored.iter_batches(batch_size=256, batch_format="numpy"):
        scores.append(batch["scores"])
        targets.append(batch["tags"])
    if not scores:
        return {"images": 0, "map": None, "ap": {name: None for name in class_names}}
    ap = average_precision(np.concatenate(scores), np.concatenate(targets))
    return {"images": int(sum(len(s) for s in scores)),
            "map": None if np.all(np.isnan(ap)) else round(float(np.nanmean(ap)), 4),
            "ap": {name: None if np.isnan(v) else round(float(v), 4) for name, v in zip(class_names, ap, strict=True)}}
