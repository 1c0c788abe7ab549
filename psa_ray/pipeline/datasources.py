"""Ray Data datasources: a manifest read as checked rows (`ManifestDatasource`) and whole Parquet
files (`parquet_dataset`, through `ray_compat.TableFilesDatasource`)."""
from __future__ import annotations

import functools
import posixpath
from typing import Any

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from psa_ray.io.checked_rows import read_part
from psa_ray.io.manifest import ManifestPart
from psa_ray.io.storage import list_files
from psa_ray.pipeline.ray_compat import TableFilesDatasource

# CPUs of a read or row-filter task: a whole one would wait behind the fractional actors of a
# small cluster (and starve the writes).
READ_CPUS = 0.5


class ManifestDatasource(Datasource):
    """A manifest (file or sharded folder, local or s3://) read as checked rows
    (`io.checked_rows.read_part`), one read task per part (a Parquet row group, a JSONL/CSV file),
    BLOCK_ROWS rows a block."""

    def __init__(self, parts: list[ManifestPart], class_names: list[str], base: str):
        self.parts, self.class_names, self.base = parts, class_names, base

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(read_part, part, self.class_names, self.base),
                         BlockMetadata(num_rows=None, size_bytes=None, input_files=(part.uri,), exec_stats=None))
                for part in self.parts]


def parquet_dataset(prefix: str, columns: list[str] | None = None, *,
                     name_prefix: str = "") -> ray.data.Dataset | None:
    """The Parquet files under prefix (whose names start with name_prefix) as a Dataset; None if
    there are none. Lists the folder: for tables of thousands of rows a file, not per object.
    Of `columns`, each file gives those it has (older files may lack newer columns)."""
    files = [f for f in list_files(prefix, suffix=".parquet")
             if posixpath.basename(f).startswith(name_prefix)]
    if not files:
        return None
    dataset: ray.data.Dataset = ray.data.read_datasource(TableFilesDatasource(files, columns), num_cpus=READ_CPUS,
                                                         override_num_blocks=len(files))
    return dataset
