"""Running a network on a list of differently sized images: grouping, precision, DeepLab's output."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def same_shape_groups(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by shape (first appearance order): each group can be stacked."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(i)
    return list(groups.values())


def precision(device: torch.device, autocast: torch.dtype | None) -> AbstractContextManager:
    """Autocast to `autocast` (e.g. torch.bfloat16) on `device`; None: float32, no autocast."""
    return torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None)


def segment_probabilities(model: nn.Module, images: Sequence[Tensor],
                          autocast: torch.dtype | None = None) -> list[Tensor]:
    """images[i] [3,H_i,W_i] normalised -> class probabilities [K,H_i,W_i] (float32) per image:
    DeepLab's logits upsampled bilinearly to the image size, as in training, then a softmax.
    Images of one size share a forward pass. `autocast`: the precision of the network's
    inference (None: float32)."""
    out: list[Tensor] = [None] * len(images)  # type: ignore[list-item]
    for group in same_shape_groups(images):
        batch = torch.stack([images[i] for i in group])
        with torch.inference_mode(), precision(batch.device, autocast):
            logits = model(batch)
        logits = F.interpolate(logits.float(), size=batch.shape[-2:], mode="bilinear", align_corners=False)
        for n, probs in zip(group, logits.softmax(dim=1)):
            out[n] = probs
    return out
