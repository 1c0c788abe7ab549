"""map_same_shape (psa_ray.ops.forward): one call per shape group, results back in input order."""
from __future__ import annotations

import pytest
import torch

from psa_ray.ops.forward import map_same_shape


def test_each_group_is_called_once_and_results_keep_the_input_order() -> None:
    """Five tensors of three shapes, interleaved: fn sees each group once, in first-appearance order
    with increasing indices, and result i belongs to tensor i."""
    tensors = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(2, 3), torch.zeros(1, 1), torch.zeros(4)]
    calls: list[list[int]] = []

    def describe(group: list[int]) -> list[tuple[int, tuple[int, ...]]]:
        calls.append(group)
        return [(i, tuple(tensors[i].shape)) for i in group]

    assert map_same_shape(describe, tensors) == [(i, tuple(t.shape)) for i, t in enumerate(tensors)]
    assert calls == [[0, 2], [1, 4], [3]]


def test_batched_results_are_scattered_back() -> None:
    """A group's stacked batch, unbound, gives each tensor its own row; no tensors, no calls."""
    tensors = [torch.full((2,), float(i)) for i in range(3)] + [torch.full((3,), 3.0)]
    out = map_same_shape(lambda group: (torch.stack([tensors[i] for i in group]) * 2).unbind(), tensors)
    for tensor, result in zip(tensors, out, strict=True):
        torch.testing.assert_close(result, tensor * 2)
    assert map_same_shape(lambda group: pytest.fail("called on no tensors"), []) == []


def test_a_result_count_that_is_not_the_group_size_is_an_error() -> None:
    with pytest.raises(ValueError):
        map_same_shape(lambda group: group[:1], [torch.zeros(1), torch.zeros(1)])
