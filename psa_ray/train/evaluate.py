"""Evaluation of trained networks on held-out rows."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from psa_ray.models.inference import load_trained, to_tensor
from psa_ray.ops.metrics import mean_average_precision
from psa_ray.pipeline.readers import decoded_dataset, drop_failed, rows_dataset


def classifier_map(weights_uri: str, rows: list[dict[str, Any]]) -> float:
    """Classification mAP of a CAM network over rows (whole images, one scale)."""
    model = load_trained(weights_uri)
    scores, targets = [], []
    for batch in decoded_dataset(rows_dataset(rows)).map_batches(drop_failed).iter_batches(batch_size=16):
        with torch.inference_mode():
            for rgb, tags in zip(batch["rgb"], batch["tags"]):
                scores.append(torch.sigmoid(model(to_tensor(rgb)[None]))[0].numpy())
                targets.append(np.asarray(tags))
    return float(mean_average_precision(np.stack(scores), np.stack(targets)))
