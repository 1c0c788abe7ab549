"""Running a network on a list of differently sized images: grouping, precision, DeepLab's output."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

T = TypeVar("T")


def upscaled_size(height: int, width: int, min_side: int) -> tuple[int, int]:
    """(height, width) upscaled so that the short side is at least `min_side` (0: as it is).

    A network at stride 8 sees a small image coarsely (a 128 px image: 16 x 16 cells), and an
    ImageNet network finds objects at ImageNet's object size; photos of ~500 px need no upscaling.
    """
    scale = max(1.0, min_side / min(height, width))
    return round(height * scale), round(width * scale)


def same_shape_groups(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by shape (first appearance order): each group can be stacked."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(i)
    return list(groups.values())


def map_same_shape(fn: Callable[[list[int]], Iterable[T]], tensors: Sequence[Tensor]) -> list[T]:
    """fn(group) once per group of `same_shape_groups(tensors)`, in that order -> [len(tensors)] results
    in the tensors' order.

    A group holds the indices (increasing) of the tensors of one shape, so they stack; fn returns
    one result per index, in the group's order (ValueError if the counts differ).
    """
    results: dict[int, T] = {}
    for group in same_shape_groups(tensors):
        results.update(zip(group, fn(group), strict=True))
    return [results[i] for i in range(len(tensors))]


def precision(device: torch.device, autocast: torch.dtype | None) -> torch.autocast:
    """Autocast to `autocast` (e.g. torch.bfloat16) on `device`; None: float32, no autocast."""
    return torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None)


def segment_probabilities(model: nn.Module, images: Sequence[Tensor],
                          autocast: torch.dtype | None = None) -> list[Tensor]:
    """images[i] [3,H_i,W_i] normalised -> class probabilities [K,H_i,W_i] (float32) per image:
    DeepLab's logits upsampled bilinearly to the image size, as in training, then a softmax.
    Images of one size share a forward pass. `autocast`: the precision of the network's
    inference (None: float32)."""
    def probabilities(group: list[int]) -> tuple[Tensor, ...]:
        batch = torch.stack([images[i] for i in group])
        with torch.inference_mode(), precision(batch.device, autocast):
            logits: Tensor = model(batch)
        logits = F.interpolate(logits.float(), size=batch.shape[-2:], mode="bilinear", align_corners=False)
        return logits.softmax(dim=1).unbind()

    return map_same_shape(probabilities, images)
