"""Grouping a batch of differently sized images so that the ones of one size run together."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def same_shape_groups(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the tensors grouped by shape (first appearance order): each group can be stacked."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(i)
    return list(groups.values())
