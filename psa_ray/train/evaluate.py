"""Evaluation of trained networks on held-out rows."""
from __future__ import annotations

import numpy as np
import ray
import torch

from psa_ray.models.inference import load_trained, to_tensor
from psa_ray.ops.metrics import mean_average_precision


def classifier_map(weights_uri: str, dataset: ray.data.Dataset) -> float:
    """Classification mAP of a CAM network over decoded rows (`rgb`, multi-hot `tags`; whole
    images, one scale)."""
    model = load_trained(weights_uri)
    scores, targets = [], []
    for batch in dataset.iter_batches(batch_size=16):
        with torch.inference_mode():
            for rgb, tags in zip(batch["rgb"], batch["tags"]):
                scores.append(torch.sigmoid(model(to_tensor(rgb)[None]))[0].numpy())
                targets.append(np.asarray(tags))
    return float(mean_average_precision(np.stack(scores), np.stack(targets)))
