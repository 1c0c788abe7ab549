"""Typed adapters where Ray's annotations do not fit this package's use; each returns its argument
or Ray's result unchanged (mypy checks pipeline/ and train/ through them)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import pyarrow as pa
    import ray
    from ray.data.block import DataBatch, UserDefinedFunction


def batch_fn(fn: Callable[..., Any]) -> UserDefinedFunction[DataBatch, DataBatch]:
    """`fn` as `Dataset.map_batches` takes it. Ray types a batch function's argument as the union
    of every batch format (Arrow, pandas, dict of numpy arrays); a function of the one format it
    runs with (`batch_format`) is not that for mypy."""
    return cast("UserDefinedFunction[DataBatch, DataBatch]", fn)


def arrow_batches(dataset: ray.data.Dataset, batch_size: int) -> Iterable[pa.Table]:
    """`dataset.iter_batches` in Arrow tables (Ray types its batches as the union of every format)."""
    return cast("Iterable[pa.Table]", dataset.iter_batches(batch_size=batch_size, batch_format="pyarrow"))
