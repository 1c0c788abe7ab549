"""Manifest files (stable interface): their formats, read a part at a time (`io.inputs` reads
manifests and PASCAL VOC folders with them; `pipeline.corpus` streams them through Ray Data).

Manifest: `.parquet`, `.jsonl` or `.csv` with columns `image_id` (unique string, used in output
file names), `image` (s3:// URI, absolute path, or path relative to the manifest's folder) and
`tags` (class names: list<string> in Parquet, a JSON list in JSONL, `|`-separated in CSV).
Class names: `classes=` or `classes.txt` beside the manifest (`io.classes`). Each row is checked
by the rules of `io.rows`; problems with the manifest as a whole raise ManifestError.
"""
from __future__ import annotations

import codecs
import csv
import json
import posixpath
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from psa_ray.io.classes import CSV_TAG_SEPARATOR, resolve_classes
from psa_ray.io.rows import Corpus, ManifestError, RowError, usable_corpus, validate_records
from psa_ray.io.storage import filesystem, list_files, parent, with_retries

MANIFEST_FORMATS = ("parquet", "jsonl", "csv")

# A row's place in the corpus: file_index * ROW_STRIDE + its 0-based row (line) in the file. It
# orders rows for "the first row with an id keeps it" across sharded manifests.
ROW_STRIDE = 2**40


@dataclass(frozen=True)
class ManifestPart:
    """A piece of a manifest that is read on its own: (a slice of) a Parquet row group or a whole
    JSONL/CSV file.

    first_row: the part's first row within its file (0-based); label: how messages name the file
    ('' for a manifest of one file).
    """

    uri: str
    fmt: str
    file_index: int
    first_row: int = 0
    row_group: int | None = None  # Parquet: the row group holding the part, which starts at
    group_start: int = 0          # this row of the file
    num_rows: int | None = None   # None: to the end of the file / row group
    label: str = ""
    tagged: bool = True           # whether rows carry tags (False: images to predict)

    @property
    def base_row(self) -> int:
        """The place in the corpus of its file's first row (ROW_STRIDE)."""
        return self.file_index * ROW_STRIDE


# Parquet row groups larger than this are read as several parts (pyarrow writes 1Mi-row groups).
PART_ROWS = 1 << 18


def format_of(uri: str) -> str | None:
    suffix = posixpath.splitext(uri.rstrip("/"))[1].lower().lstrip(".")
    return suffix if suffix in MANIFEST_FORMATS else None


def _columns(tagged: bool) -> list[str]:
    return ["image_id", "image", "tags"] if tagged else ["image_id", "image"]


def _require_columns(present: Sequence[str], uri: str, tagged: bool) -> None:
    missing = [c for c in _columns(tagged) if c not in present]
    if missing:
        raise ManifestError(f"manifest {uri} lacks required column(s) {', '.join(missing)} "
                            f"(has: {', '.join(map(str, present)) or 'none'})")


def _open(uri: str, endpoint_url: str | None, random_access: bool = False) -> Any:
    try:
        fs, path = filesystem(uri, endpoint_url)
        return with_retries(lambda: fs.open_input_file(path) if random_access else fs.open_input_stream(path))
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {uri}") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"manifest {uri} is unreadable: {e}") from None


def _parquet_file(uri: str, endpoint_url: str | None) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(_open(uri, endpoint_url, random_access=True))
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"manifest {uri} is not a readable Parquet file: {e}") from None


def _check_parquet_schema(schema: pa.Schema, uri: str, tagged: bool) -> None:
    _require_columns(schema.names, uri, tagged)
    for name in ("image_id", "image"):
        if not (pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)):
            raise ManifestError(f"manifest {uri}: column {name} must be string, "
                                f"got {schema.field(name).type}")
    if not tagged:
        return
    tags = schema.field("tags").type
    if not ((pa.types.is_list(tags) or pa.types.is_large_list(tags))
            and (pa.types.is_string(tags.value_type) or pa.types.is_large_string(tags.value_type))):
        raise ManifestError(f"manifest {uri}: column tags must be list<string>, got {tags}")


def _text_lines(uri: str, endpoint_url: str | None) -> Iterator[str]:
    """The lines of a UTF-8 text file (newlines kept), read in 1 MiB pieces."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    with _open(uri, endpoint_url) as stream:
        while True:
            chunk = stream.read(1 << 20)
            try:
                text = pending + decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                raise ManifestError(f"manifest {uri} is not UTF-8 text") from None
            lines = text.splitlines(keepends=True)
            pending = lines.pop() if lines and not lines[-1].endswith(("\n", "\r")) and chunk else ""
            yield from lines
            if not chunk:
                if pending:
                    yield pending
                return


def _check_text_header(uri: str, fmt: str, endpoint_url: str | None, tagged: bool) -> None:
    """The required columns, from the CSV header or the first JSONL record that is an object."""
    lines = _text_lines(uri, endpoint_url)
    if fmt == "csv":
        _require_columns(next(csv.reader(lines), []), uri, tagged)
        return
    for line in lines:
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            _require_columns(sorted(record), uri, tagged)
            return


def manifest_parts(uri: str, endpoint_url: str | None = None, tagged: bool = True) -> list[ManifestPart]:
    """The parts of a manifest file, or of a sharded manifest (a folder/prefix of files of one
    format, read in name order). Checks each file's columns (`tags` only where `tagged`); raises
    ManifestError."""
    fmt = format_of(uri)
    files = [uri]
    if fmt is None:
        fs, path = filesystem(uri, endpoint_url)
        if with_retries(lambda: fs.get_file_info(path).type) != pafs.FileType.Directory:
            raise ManifestError(f"{uri} is neither a manifest ({', '.join('.' + f for f in MANIFEST_FORMATS)}), "
                                "a folder of manifest files, nor a PASCAL VOC 2012 folder "
                                "(no ImageSets/Segmentation)")
        listed = [f for f in list_files(uri, endpoint_url=endpoint_url) if format_of(f)]
        formats = sorted({f for f in map(format_of, listed) if f})
        if len(formats) != 1:
            raise ManifestError(f"{uri} is neither a manifest ({', '.join('.' + f for f in MANIFEST_FORMATS)}) "
                                "nor a folder of manifest files of one format"
                                + (f" (it holds {', '.join(formats)})" if formats else ""))
        fmt, files = formats[0], listed
    parts: list[ManifestPart] = []
    for index, file_uri in enumerate(files):
        label = "" if len(files) == 1 else f"{posixpath.basename(file_uri)} "
        if fmt == "parquet":
            meta = _parquet_file(file_uri, endpoint_url)
            _check_parquet_schema(meta.schema_arrow, file_uri, tagged)
            start = 0
            for group in range(meta.metadata.num_row_groups):
                size = meta.metadata.row_group(group).num_rows
                parts += [ManifestPart(file_uri, fmt, index, first, group, start, min(PART_ROWS, start + size - first),
                                       label, tagged) for first in range(start, start + size, PART_ROWS)]
                start += size
        else:
            _check_text_header(file_uri, fmt, endpoint_url, tagged)
            parts.append(ManifestPart(file_uri, fmt, index, 0, None, label=label, tagged=tagged))
    return parts


def part_records(part: ManifestPart, batch_rows: int = 4096,
                 endpoint_url: str | None = None) -> Iterator[list[dict[str, Any]]]:
    """The raw records of a part, batch_rows at a time: dicts with image_id, image, tags (as the
    file has them), `row` (ROW_STRIDE-based place in the corpus) and `where` (for messages)."""
    base_row = part.base_row
    if part.fmt == "parquet":
        for first, table in parquet_batches(part, batch_rows, endpoint_url):
            yield parquet_records(part, table, np.arange(first, first + table.num_rows))
        return
    lines = _text_lines(part.uri, endpoint_url)
    if part.fmt == "csv":
        reader = csv.DictReader(lines)
        records = []
        for number, r in enumerate(reader, 1):
            records.append({"image_id": r.get("image_id"), "image": r.get("image"),
                            "tags": None if r.get("tags") is None else r["tags"].split(CSV_TAG_SEPARATOR),
                            "row": base_row + number - 1, "where": f"{part.label}row {number}"})
            if len(records) == batch_rows:
                yield records
                records = []
        if records:
            yield records
        return
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = {"row": base_row + number - 1, "where": f"{part.label}line {number}"}
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            value = e.msg
        if isinstance(value, dict):
            record.update(image_id=value.get("image_id"), image=value.get("image"), tags=value.get("tags"))
        else:
            record.update(image_id=None, image=None, tags=None, rejected=RowError(
                "", "", "manifest", "bad_row", f"line {number} of {part.uri} is not a JSON object: "
                f"{str(value)[:80]}"))
        records.append(record)
        if len(records) == batch_rows:
            yield records
            records = []
    if records:
        yield records


def parquet_batches(part: ManifestPart, batch_rows: int = 4096,
                    endpoint_url: str | None = None) -> Iterator[tuple[int, pa.Table]]:
    """A Parquet part's (image_id, image, tags) columns, batch_rows rows at a time, each with the
    file's row number (0-based) of its first row."""
    group = _parquet_file(part.uri, endpoint_url).read_row_group(part.row_group, _columns(part.tagged))
    first = part.first_row
    for batch in group.slice(part.first_row - part.group_start, part.num_rows).to_batches(max_chunksize=batch_rows):
        yield first, pa.Table.from_batches([batch])
        first += batch.num_rows


def parquet_records(part: ManifestPart, table: pa.Table, file_rows: np.ndarray) -> list[dict[str, Any]]:
    """Records (as part_records gives them) of a Parquet part's rows at file_rows (0-based)."""
    records: list[dict[str, Any]] = table.to_pylist()
    for record, row in zip(records, file_rows.tolist(), strict=True):
        record.update(row=part.base_row + row, where=f"{part.label}row {row + 1}")
    return records


def read_manifest(uri: str, classes: list[str] | str | None,
                   endpoint_url: str | None) -> tuple[Corpus, list[RowError]]:
    parts = manifest_parts(uri, endpoint_url)
    class_names = resolve_classes(classes, uri, endpoint_url)
    records = (r for part in parts for batch in part_records(part, endpoint_url=endpoint_url) for r in batch)
    rows, errors = validate_records(records, class_names, manifest_base(uri))
    return usable_corpus(rows, errors, class_names, uri)


def manifest_base(uri: str) -> str:
    """The folder that relative image paths of a manifest (file or folder of files) start from."""
    return uri.rstrip("/") if format_of(uri) is None else parent(uri)
