"""Stage 0's files in `<output>/rows/`: the checked rows of a manifest streamed by Ray Data
(`CorpusSink`) or of a VOC folder read in memory (`stage_voc`), the usable ones to
`part-<first row>.parquet` (ROWS_SCHEMA), the rejected ones to `rejected-<first row>.parquet`
(ERROR_SCHEMA); names from the rows, so a retried write replaces its own files."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from psa_ray.io.checked_rows import ROWS_SCHEMA, checked_table
from psa_ray.io.inputs import read_corpus
from psa_ray.io.rows import ERROR_SCHEMA
from psa_ray.io.storage import join
from psa_ray.pipeline.writers import error_table, write_table

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext


def _name(first_row: int) -> str:
    return f"{first_row:016x}.parquet"


class CorpusSink(Datasink[dict[str, int]]):
    """Checked rows (CHECKED_SCHEMA blocks) to `part-` and `rejected-` files in a folder."""

    def __init__(self, folder_uri: str):
        self.folder = folder_uri

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> dict[str, int]:
        counts = {"rows": 0, "errors": 0}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            name = _name(pa.compute.min(table.column("row")).as_py())
            bad = pa.compute.not_equal(table.column("error"), "")
            good = table.filter(pa.compute.invert(bad)).select(ROWS_SCHEMA.names)
            errors = table.filter(bad).select(ERROR_SCHEMA.names)
            if good.num_rows:
                write_table(join(self.folder, f"part-{name}"), good)
            if errors.num_rows:
                write_table(join(self.folder, f"rejected-{name}"), errors)
            counts["rows"] += good.num_rows
            counts["errors"] += errors.num_rows
        return counts


def stage_voc(input_uri: str, classes: str | None, folder_uri: str) -> list[str]:
    """A VOC folder (small) read in memory and staged in folder_uri as a manifest's rows are;
    its class names."""
    corpus, errors = read_corpus(input_uri, classes=classes)
    records = [{"image_id": r.image_id, "image": r.image, "tags": r.tags, "row": i, "where": f"row {i + 1}"}
               for i, r in enumerate(corpus.rows)]
    names = list(corpus.class_names)
    table = checked_table(records, names, set(names), "/")
    write_table(join(folder_uri, f"part-{_name(0)}"), table.select(ROWS_SCHEMA.names))
    if errors:
        write_table(join(folder_uri, f"rejected-{_name(0)}"), error_table([e.to_dict() for e in errors]))
    return names
