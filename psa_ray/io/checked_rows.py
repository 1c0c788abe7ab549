"""A manifest part's rows checked into Arrow tables (CHECKED_SCHEMA): the usable rows in the
columns of `<output>/rows/` (ROWS_SCHEMA) and the rejected ones in those of errors/ (ERROR_SCHEMA),
as stage 0 stages them. Rows that `rows.plain_rows` passes are built from Arrow columns
(`plain_table`), the others record by record with `rows.check_record` (`checked_table`): the
same table either way."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from psa_ray.io.keys import id_key, key_array
from psa_ray.io.manifest import ManifestPart, parquet_batches, parquet_records, part_records
from psa_ray.io.rows import CorpusRow, check_record, plain_rows

# Rows a manifest read task checks and hands on at a time (one Parquet file of rows/ each).
BLOCK_ROWS = 8192
ROWS_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.string()), ("tag_names", pa.string()),
                         ("row", pa.int64()), ("where", pa.string()), ("key", pa.binary(16))])
CHECKED_SCHEMA = ROWS_SCHEMA.append(pa.field("stage", pa.string())).append(
    pa.field("error", pa.string())).append(pa.field("message", pa.string()))


def checked_table(records: list[dict[str, Any]], class_names: list[str], known: set[str],
                  base: str) -> pa.Table:
    """records (io.manifest.part_records) checked: usable rows in ROWS_SCHEMA, plus the error
    columns (ERROR_SCHEMA: `error` is '' for usable rows); CHECKED_SCHEMA."""
    columns: dict[str, list[Any]] = {name: [] for name in CHECKED_SCHEMA.names}
    for record in records:
        checked = check_record(record, class_names, known, base)
        if isinstance(checked, CorpusRow):
            tag_names, key, stage, error, message = "|".join(checked.tags), id_key(checked.image_id), "", "", ""
        else:
            tag_names, key, stage, error, message = "", bytes(16), checked.stage, checked.error, checked.message
        for name, value in zip(CHECKED_SCHEMA.names, (checked.image_id, checked.image, tag_names, record["row"],
                                                      record["where"], key, stage, error, message), strict=True):
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=CHECKED_SCHEMA)


def plain_table(part: ManifestPart, table: pa.Table, file_rows: np.ndarray, base: str) -> pa.Table:
    """Rows that `rows.plain_rows` passed (at file_rows, 0-based), as `checked_table` would give
    them, from Arrow columns: the image joined to base, tags joined by '|'."""
    n = table.num_rows
    empty = pa.array([""] * n, pa.string())
    ids = table.column("image_id").combine_chunks()
    return pa.table({
        "image_id": ids,
        "image": pc.binary_join_element_wise(base.rstrip("/"), table.column("image"), "/"),
        "tag_names": pc.binary_join(table.column("tags"), "|"),
        "row": pa.array(part.base_row + file_rows, pa.int64()),
        "where": pc.binary_join_element_wise(f"{part.label}row ", pa.array(file_rows + 1).cast(pa.string()), ""),
        "key": key_array(ids.to_pylist()),
        "stage": empty, "error": empty, "message": empty}, schema=CHECKED_SCHEMA)


def read_part(part: ManifestPart, class_names: list[str], base: str) -> Iterator[pa.Table]:
    """A manifest part checked, BLOCK_ROWS rows a table (CHECKED_SCHEMA, in row order); base is
    absolute."""
    known = set(class_names)
    if part.fmt != "parquet":
        for records in part_records(part, BLOCK_ROWS):
            yield checked_table(records, class_names, known, base)
        return
    for first, table in parquet_batches(part, BLOCK_ROWS):
        rows = np.arange(first, first + table.num_rows)
        plain = plain_rows(table, class_names, base)
        others = parquet_records(part, table.filter(pa.array(~plain)), rows[~plain])
        yield pa.concat_tables([plain_table(part, table.filter(pa.array(plain)), rows[plain], base),
                                checked_table(others, class_names, known, base)]).sort_by("row")
