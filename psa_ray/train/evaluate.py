"""Evaluation of trained networks on held-out rows."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from psa_ray.models.networks import build_model
from psa_ray.models.weights import load_weights
from psa_ray.ops.metrics import mean_average_precision
from psa_ray.pipeline.readers import decoded_dataset, drop_failed
from psa_ray.train.augment import to_tensor
from psa_ray.train.loop import read_meta


def load_trained(weights_uri: str) -> torch.nn.Module:
    """A network exported by `fit`, rebuilt from the meta.json beside its weights, in eval mode."""
    meta = read_meta(weights_uri)
    kind = meta["kind"]
    num_classes = {"cam": meta["num_classes"], "deeplab": meta["num_classes"] + 1}.get(kind)
    model = build_model(kind, meta["backbone"], num_classes)
    load_weights(model, weights_uri)
    return model.eval()


def classifier_map(weights_uri: str, rows: list[dict[str, Any]]) -> float:
    """Classification mAP of a CAM network over rows (whole images, one scale)."""
    model = load_trained(weights_uri)
    scores, targets = [], []
    for batch in decoded_dataset(rows).map_batches(drop_failed).iter_batches(batch_size=16):
        with torch.inference_mode():
            for rgb, tags in zip(batch["rgb"], batch["tags"]):
                scores.append(torch.sigmoid(model(to_tensor(rgb)[None]))[0].numpy())
                targets.append(np.asarray(tags))
    return float(mean_average_precision(np.stack(scores), np.stack(targets)))
