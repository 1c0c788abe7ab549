"""Writing a corpus's rows as a manifest file (the built-in corpora, benchmarks, tests)."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from psa_ray.io.classes import CSV_TAG_SEPARATOR
from psa_ray.io.manifest import MANIFEST_FORMATS, format_of
from psa_ray.io.rows import CorpusRow
from psa_ray.io.storage import write_bytes


def write_manifest(corpus_rows: Sequence[CorpusRow], uri: str, format: str | None = None,
                   endpoint_url: str | None = None) -> None:
    """Write rows as a manifest; format ("parquet", "jsonl", "csv") defaults to uri's suffix."""
    fmt = format or format_of(uri)
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"manifest format must be one of {MANIFEST_FORMATS}, got {fmt!r} for {uri}")
    if fmt == "parquet":
        table = pa.table({"image_id": pa.array([r.image_id for r in corpus_rows], pa.string()),
                          "image": pa.array([r.image for r in corpus_rows], pa.string()),
                          "tags": pa.array([list(r.tags) for r in corpus_rows], pa.list_(pa.string()))})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        data = sink.getvalue()
    elif fmt == "jsonl":
        data = "".join(json.dumps({"image_id": r.image_id, "image": r.image, "tags": list(r.tags)}) + "\n"
                       for r in corpus_rows).encode()
    else:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["image_id", "image", "tags"])
        writer.writerows([r.image_id, r.image, CSV_TAG_SEPARATOR.join(r.tags)] for r in corpus_rows)
        data = text.getvalue().encode()
    write_bytes(uri, data, endpoint_url)
