"""Workarounds for the pinned Ray (RAY_VERSION), in one place.

Each works around a behaviour of Ray 2.60 that a newer Ray may change; tests/test_ray_compat.py
fails when the installed Ray is another version, so that someone re-checks them (and the
fractional CPU requests that `datasources.READ_CPUS` and `stages.COMMIT_CPUS` explain).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from psa_ray.pipeline.writers import read_table

RAY_VERSION = "2.60.0"


def repartition(rows: ray.data.Dataset, rows_per_block: int, num_cpus: float) -> ray.data.Dataset:
    """rows in blocks of rows_per_block, the step asking for num_cpus.

    Ray 2.60's repartition takes no resource argument and asks for a whole CPU, which on a 2-core
    (or 1-core) node beside the fractional actors leaves nothing for the writes until it has
    streamed its whole input; with the CPUs of the step before it, it fuses into that step. The
    request is set on the plan's private node (no public API)."""
    blocks = rows.repartition(target_num_rows_per_block=rows_per_block)
    node: Any = blocks._logical_plan.dag  # a StreamingRepartition, whose ray_remote_args Ray sets untyped
    node.ray_remote_args["num_cpus"] = num_cpus
    return blocks


def _read_table_file(uri: str, columns: list[str] | None) -> Iterator[pa.Table]:
    yield read_table(uri, columns, present_only=True)


class TableFilesDatasource(Datasource):
    """Parquet files (local or s3://) read whole, one read task per file. Not `read_parquet`:
    Ray 2.60 plans it with a listing task that asks for a whole CPU, which no argument changes and
    which never runs beside the fractional actors of a 1-CPU node."""

    def __init__(self, files: list[str], columns: list[str] | None = None):
        self.files, self.columns = files, columns

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_table_file, uri, self.columns),
                         BlockMetadata(num_rows=None, size_bytes=None, input_files=(uri,), exec_stats=None))
                for uri in self.files]
