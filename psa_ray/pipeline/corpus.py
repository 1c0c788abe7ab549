"""The corpus as Ray Data streams it: the manifest validated once into `<output>/rows/`, then read
by every stage as Parquet tables (`TableFilesDatasource`). Nothing on the driver grows with the
corpus but the first 8 bytes of each row's key while duplicates and the training sample are found
(80 MB at 10M rows), and the 16-byte keys of committed rows when a run resumes.

- `prepare_corpus` (once per output; a rerun reuses it): Ray Data reads the manifest's parts
  (`ManifestDatasource`: Parquet row groups, JSONL/CSV files, local or s3://) and checks each row
  in its read task (`io.manifest.plain_rows` with Arrow kernels, `check_record` for the rows
  that need more); `CorpusSink` writes the usable rows to
  `rows/part-<first row>.parquet` and the rejected ones to `errors/manifest-<first row>.parquet`.
  The rows' key prefixes (`io.manifest.id_key`) then give the duplicate ids (rows of a repeated
  prefix are compared by id; the first row in manifest order keeps an id;
  `errors/manifest-duplicates.parquet` holds the others) and the training sample (the rows of the
  `train_images` smallest keys). `rows/_corpus.json`, written last, marks
  the folder complete; an incomplete one is removed and redone.
- `corpus_dataset`: the usable rows as a Dataset (`image_id, image, tag_names, tags` multi-hot,
  `gt_uri`, optionally `mask_uri`), optionally only the sample, without or only with the ids
  committed under given tables (`committed_keys`): resume and "which images have seeds" are
  key lookups against committed Parquet tables, never object listings.
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from psa_ray.data import write_corpus
from psa_ray.errors import UserError
from psa_ray.io.manifest import (
    ERROR_SCHEMA, ROW_STRIDE, CorpusRow, ManifestError, ManifestPart, RowError, absolute_base,
    all_rejected_message, check_record, duplicate_error, id_key, manifest_base, manifest_parts, parquet_batches,
    parquet_records, part_records, plain_rows, resolve_classes)
from psa_ray.io.inputs import read_corpus
from psa_ray.io.voc import voc_root
from psa_ray.io.storage import exists, join, list_files, read_bytes, remove_tree, write_bytes
from psa_ray.pipeline.writers import error_table, read_table, table_rows, write_table

ROWS_FOLDER, CORPUS_FILE = "rows", "_corpus.json"
DUPLICATES_FILE = "manifest-duplicates.parquet"  # in errors/
# Rows a manifest read task checks and hands on at a time (one Parquet file of rows/ each).
BLOCK_ROWS = 8192
KEY = "S16"  # numpy dtype of id keys
# CPUs of a read or row-filter task: a whole one would wait behind the fractional actors of a
# small cluster (and starve the writes).
READ_CPUS = 0.5
ROWS_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.string()), ("tag_names", pa.string()),
                         ("row", pa.int64()), ("where", pa.string()), ("key", pa.binary(16))])


@dataclass(frozen=True)
class CorpusIndex:
    """What `prepare_corpus` found: enough for every stage to build its Dataset."""

    rows_uri: str                 # <output>/rows: the usable rows, Parquet
    class_names: list[str]
    num_rows: int                 # usable rows (duplicates not counted)
    num_errors: int               # rejected manifest rows, duplicates included
    duplicates_uri: str | None    # errors/manifest-duplicates.parquet, if any
    sample: dict[str, Any] = field(default_factory=dict)  # size, rule, threshold (hex key)


# --------------------------------------------------------------------------- reading the manifest

CHECKED_SCHEMA = ROWS_SCHEMA.append(pa.field("stage", pa.string())).append(
    pa.field("error", pa.string())).append(pa.field("message", pa.string()))


def checked_table(records: list[dict[str, Any]], class_names: list[str], known: set[str],
                  base: str) -> pa.Table:
    """records (io.manifest.part_records) checked: usable rows in ROWS_SCHEMA, plus the error
    columns (ERROR_SCHEMA: `error` is '' for usable rows); CHECKED_SCHEMA."""
    columns: dict[str, list[Any]] = {name: [] for name in CHECKED_SCHEMA.names}
    for record in records:
        checked = check_record(record, class_names, known, base)
        ok = isinstance(checked, CorpusRow)
        columns["image_id"].append(checked.image_id)
        columns["image"].append(checked.image)
        columns["tag_names"].append("|".join(checked.tags) if ok else "")
        columns["row"].append(record["row"])
        columns["where"].append(record["where"])
        columns["key"].append(id_key(checked.image_id) if ok else bytes(16))
        columns["stage"].append("" if ok else checked.stage)
        columns["error"].append("" if ok else checked.error)
        columns["message"].append("" if ok else checked.message)
    return pa.Table.from_pydict(columns, schema=CHECKED_SCHEMA)


def plain_table(part: ManifestPart, table: pa.Table, file_rows: np.ndarray, base: str) -> pa.Table:
    """Rows that `io.manifest.plain_rows` passed (at file_rows, 0-based), as `checked_table` would
    give them, from Arrow columns: the image joined to base, tags joined by '|'."""
    n = table.num_rows
    empty = pa.array([""] * n, pa.string())
    ids = table.column("image_id").combine_chunks()
    return pa.table({
        "image_id": ids,
        "image": pa.compute.binary_join_element_wise(base.rstrip("/"), table.column("image"), "/"),
        "tag_names": pa.compute.binary_join(table.column("tags"), "|"),
        "row": pa.array(part.file_index * ROW_STRIDE + file_rows, pa.int64()),
        "where": pa.compute.binary_join_element_wise(f"{part.label}row ", pa.array(file_rows + 1).cast(pa.string()),
                                                     ""),
        "key": pa.array([id_key(i) for i in ids.to_pylist()], pa.binary(16)),
        "stage": empty, "error": empty, "message": empty}, schema=CHECKED_SCHEMA)


def _read_part(part: ManifestPart, class_names: list[str], base: str) -> Iterator[pa.Table]:
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


class ManifestDatasource(Datasource):
    """A manifest (file or sharded folder, local or s3://) read as checked rows, one read task per
    part (a Parquet row group, a JSONL/CSV file), BLOCK_ROWS rows a block."""

    def __init__(self, parts: list[ManifestPart], class_names: list[str], base: str):
        self.parts, self.class_names, self.base = parts, class_names, base

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_part, part, self.class_names, self.base),
                         BlockMetadata(num_rows=None, size_bytes=None, input_files=[part.uri], exec_stats=None))
                for part in self.parts]


class CorpusSink(Datasink):
    """Usable rows to `part-<first row>.parquet`, rejected ones to `rejected-<first row>.parquet`
    (both in rows/): names from the rows, so a retried write replaces its own files."""

    def __init__(self, folder_uri: str):
        self.folder = folder_uri

    def write(self, blocks, ctx) -> dict[str, int]:
        counts = {"rows": 0, "errors": 0}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            name = f"{pa.compute.min(table.column('row')).as_py():016x}.parquet"
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
                         BlockMetadata(num_rows=None, size_bytes=None, input_files=[uri], exec_stats=None))
                for uri in self.files]


def parquet_dataset(prefix: str, columns: list[str] | None = None, *,
                     name_prefix: str = "") -> ray.data.Dataset | None:
    """The Parquet files under prefix (whose names start with name_prefix) as a Dataset; None if
    there are none. Lists the folder: for tables of thousands of rows a file, not per object.
    Of `columns`, each file gives those it has (older files may lack newer columns)."""
    files = [f for f in list_files(prefix, suffix=".parquet")
             if posixpath.basename(f).startswith(name_prefix)]
    if not files:
        return None
    return ray.data.read_datasource(TableFilesDatasource(files, columns), num_cpus=READ_CPUS,
                                    override_num_blocks=len(files))


def _keys(batch: pa.Table) -> np.ndarray:
    """The `key` column of a batch as a numpy S16 array."""
    column = batch.column("key").combine_chunks()
    if column.type != pa.binary(16):  # after a numpy-format step: variable-size binary
        column = column.cast(pa.binary(16))
    if len(column) == 0:
        return np.zeros(0, KEY)
    data = np.frombuffer(column.buffers()[1], dtype=KEY)
    return data[column.offset: column.offset + len(column)]


def _prefixes(batch: pa.Table) -> np.ndarray:
    """The first 8 bytes of each key of a batch as uint64 (their order is the keys' order)."""
    keys = _keys(batch)
    return np.frombuffer(keys.tobytes(), ">u8")[::2].astype(np.uint64)


def _collect(ds: ray.data.Dataset, count: int, dtype: Any, values: Any) -> np.ndarray:
    """values(batch) of every batch of a dataset of at most `count` rows, sorted, in one array on
    the driver (filled in place, no second copy)."""
    out = np.empty(count, dtype)
    filled = 0
    for batch in ds.select_columns(["key"]).iter_batches(batch_size=1 << 18, batch_format="pyarrow"):
        part = values(batch)
        out[filled: filled + part.size] = part
        filled += part.size
    out = out[:filled]
    out.sort()
    return out


def collect_prefixes(ds: ray.data.Dataset, count: int) -> np.ndarray:
    """The 8-byte prefixes of all `key` values, sorted, as uint64 (80 MB at 10M rows)."""
    return _collect(ds, count, np.uint64, _prefixes)


def collect_keys(ds: ray.data.Dataset, count: int) -> np.ndarray:
    """All `key` values, sorted (16 bytes a row)."""
    return _collect(ds, count, KEY, _keys)


def _with_keys(batch: pa.Table) -> pa.Table:
    ids = batch.column("image_id").to_pylist()
    return pa.table({"key": pa.array([id_key(i) for i in ids], pa.binary(16))})


def _not_manifest(batch: pa.Table) -> pa.Table:
    return batch.filter(pa.compute.not_equal(batch.column("stage"), "manifest"))


def committed_keys(tables: str, errors: str | None = None) -> Any:
    """An object ref to the sorted keys of the image ids committed in the Parquet tables under
    `tables` (shards/, index/seeds/) and, if given, the non-manifest rows of `errors`; None if
    there are none. Read with Ray Data; the driver holds 16 bytes a committed row."""
    keys = []
    for prefix, columns in ((tables, ["image_id"]), (errors, ["image_id", "stage"])):
        ds = parquet_dataset(prefix, columns=columns) if prefix else None
        if ds is None:
            continue
        if "stage" in columns:
            ds = ds.map_batches(_not_manifest, batch_format="pyarrow", num_cpus=READ_CPUS)
        ds = ds.map_batches(_with_keys, batch_format="pyarrow", num_cpus=READ_CPUS)
        keys.append(collect_keys(ds, table_rows(prefix)))
    if not keys:
        return None
    merged = np.concatenate(keys)
    merged.sort()
    return ray.put(merged)


# --------------------------------------------------------------------------- the corpus index

def _repeated(values: np.ndarray) -> np.ndarray:
    """The values that occur more than once in a sorted array."""
    repeated = values[1:] == values[:-1]
    return np.unique(values[1:][repeated])


def _duplicates(rows: ray.data.Dataset, prefixes: np.ndarray) -> tuple[list[RowError], np.ndarray]:
    """Error rows of the usable rows whose id an earlier row keeps, and their `row` numbers. The
    rows whose key prefix repeats are fetched and compared by id (a shared prefix of two ids is
    a candidate, not a duplicate)."""
    repeated = _repeated(prefixes)
    if repeated.size == 0:
        return [], np.zeros(0, np.int64)
    ref = ray.put(repeated)

    def candidates(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(np.isin(_prefixes(batch), ray.get(ref))))

    found = rows.map_batches(candidates, batch_format="pyarrow", num_cpus=READ_CPUS).take_all()
    found.sort(key=lambda r: r["row"])
    keeper: dict[str, str] = {}
    errors, losers = [], []
    for r in found:
        if r["image_id"] in keeper:
            errors.append(duplicate_error(CorpusRow(r["image_id"], r["image"], []), r["where"],
                                          keeper[r["image_id"]]))
            losers.append(r["row"])
        else:
            keeper[r["image_id"]] = r["where"]
    return errors, np.asarray(losers, np.int64)


def sample_rule(train_images: int) -> str:
    return (f"the {train_images} usable images of smallest BLAKE2b-128 digest of image_id "
            "(psa_ray.io.manifest.id_key); all images when the corpus has fewer")


def _sample(prefixes: np.ndarray, train_images: int) -> dict[str, Any]:
    """The training sample over the sorted unique key prefixes of the usable rows: its size, rule
    and threshold (hex; a key is in the sample when it is <= the threshold, i.e. when its prefix
    is at most the size-th smallest: one image more per prefix tie at that place)."""
    size = min(train_images, len(prefixes))
    return {"train_images": train_images, "size": int(size), "rule": sample_rule(train_images),
            "threshold": (int(prefixes[size - 1]).to_bytes(8, "big") + b"\xff" * 8).hex() if size else ""}


def _unique(keys: np.ndarray) -> np.ndarray:
    if keys.size == 0:
        return keys
    first = np.ones(keys.size, bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first]


def _voc_rows(input_uri: str, classes: str | None, staging: str) -> list[str]:
    """A VOC folder (small) read in memory and staged as a manifest's rows are."""
    corpus, errors = read_corpus(input_uri, classes=classes)
    records = [{"image_id": r.image_id, "image": r.image, "tags": r.tags, "row": i, "where": f"row {i + 1}"}
               for i, r in enumerate(corpus.rows)]
    names = list(corpus.class_names)
    table = checked_table(records, names, set(names), "/")
    write_table(join(staging, f"part-{0:016x}.parquet"), table.select(ROWS_SCHEMA.names))
    if errors:
        write_table(join(staging, f"rejected-{0:016x}.parquet"), error_table([e.to_dict() for e in errors]))
    return names


def prepare_corpus(input_uri: str, output: str, classes: str | None = None,
                   train_images: int = 0) -> CorpusIndex:
    """Validate the manifest (or VOC folder) into `<output>/rows/` once; see the module docstring.

    Raises ManifestError, with nothing left in the output, for problems with the input as a
    whole: unreadable, missing columns, no class names, no usable row.
    """
    rows_uri = join(output, ROWS_FOLDER)
    marker = join(rows_uri, CORPUS_FILE)
    if exists(marker):
        index = CorpusIndex(**json.loads(read_bytes(marker)))
        if train_images and index.sample.get("train_images") != train_images:
            prefixes = collect_prefixes(parquet_dataset(rows_uri, ["key"], name_prefix="part-"),
                                        table_rows(rows_uri, name_prefix="part-"))
            index = replace(index, sample=_sample(_unique(prefixes), train_images))
            write_bytes(marker, json.dumps(asdict(index), indent=2).encode())
        return index
    created = not exists(output)
    remove_tree(rows_uri)  # an earlier run stopped before it was complete
    if voc_root(input_uri) is not None:
        names = _voc_rows(input_uri, classes, rows_uri)
    else:
        parts = manifest_parts(input_uri)
        names = resolve_classes(classes, input_uri if parts[0].uri == input_uri else parts[0].uri)
        base = absolute_base(manifest_base(input_uri))
        # one block per read block (Ray would split a few parts' blocks to fill the cluster)
        checked = ray.data.read_datasource(ManifestDatasource(parts, names, base), override_num_blocks=len(parts),
                                           num_cpus=READ_CPUS)
        checked.write_datasink(CorpusSink(rows_uri))
    rows = parquet_dataset(rows_uri, name_prefix="part-")
    if rows is None:
        message = _all_rejected(input_uri, rows_uri)
        remove_tree(output if created else rows_uri)
        raise ManifestError(message)

    count = table_rows(rows_uri, name_prefix="part-")
    prefixes = collect_prefixes(parquet_dataset(rows_uri, ["key"], name_prefix="part-"), count)
    dup_errors, losers = _duplicates(rows, prefixes)
    if dup_errors:  # no second copy of a corpus without duplicates
        prefixes = _unique(prefixes)
    duplicates_uri = None
    if dup_errors:
        duplicates_uri = join(output, "errors", DUPLICATES_FILE)
        write_table(duplicates_uri, error_table([e.to_dict() for e in dup_errors]).append_column(
            "row", pa.array(losers, pa.int64())))
    for uri in list_files(rows_uri, suffix=".parquet"):  # the rejected rows join errors/
        name = posixpath.basename(uri)
        if name.startswith("rejected-"):
            write_bytes(join(output, "errors", "manifest-" + name[len("rejected-"):]), read_bytes(uri))
    index = CorpusIndex(rows_uri=rows_uri, class_names=names, num_rows=count - len(losers),
                        num_errors=table_rows(join(output, "errors"), name_prefix="manifest-"),
                        duplicates_uri=duplicates_uri,
                        sample=_sample(prefixes, train_images) if train_images else {})
    write_bytes(marker, json.dumps(asdict(index), indent=2).encode())
    return index


def _all_rejected(input_uri: str, rows_uri: str) -> str:
    """The ManifestError message for a manifest none of whose rows is usable."""
    files = [f for f in list_files(rows_uri, suffix=".parquet") if posixpath.basename(f).startswith("rejected-")]
    if not files:
        return f"no rows in {input_uri}"
    codes: Counter = Counter()
    for uri in files:
        counts = read_table(uri, columns=["error"]).column("error").value_counts()
        codes.update({c["values"]: c["counts"] for c in counts.to_pylist()})
    first = read_table(files[0], columns=["message"]).column("message")[0].as_py()
    return all_rejected_message(sum(codes.values()), codes, first, input_uri)


# --------------------------------------------------------------------------- the rows of a stage

def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """[n] bool: which keys are in sorted_keys."""
    if sorted_keys.size == 0:
        return np.zeros(keys.size, bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[at] == keys


def held_out_rule(fraction: float) -> str:
    return (f"the images whose BLAKE2b-128 digest of image_id ends in a byte below "
            f"{held_out_byte(fraction)} (~{100 * fraction:g}% of the training sample)")


def held_out_byte(fraction: float) -> int:
    """A row is held out when the last byte of its key is below this (independent of the sample,
    which is decided by the first 8 bytes)."""
    return round(256 * fraction)


def _select(batch: pa.Table, *, losers: Any, threshold: bytes | None, exclude: Any,
            include: Any, held_out: float = 0.0, only_held_out: bool = False) -> pa.Table:
    """The rows of a batch (with `key`) that pass the filters of `corpus_dataset` / `select`."""
    keys = _keys(batch)
    keep = np.ones(batch.num_rows, bool)
    if held_out > 0:
        is_held_out = np.frombuffer(keys.tobytes(), np.uint8)[15::16] < held_out_byte(held_out)
        keep &= is_held_out if only_held_out else ~is_held_out
    if losers is not None:
        keep &= ~np.isin(batch.column("row").to_numpy(), ray.get(losers))
    if threshold is not None:
        keep &= keys <= np.array(threshold, KEY)
    if exclude is not None:
        keep &= ~_member(keys, ray.get(exclude))
    if include is not None:
        keep &= _member(keys, ray.get(include))
    return batch.filter(pa.array(keep))


def _pipeline_rows(batch: pa.Table, *, class_names: list[str], gt: str | None) -> dict[str, np.ndarray]:
    ids = batch.column("image_id").to_pylist()
    tag_names = batch.column("tag_names").to_pylist()
    position = {name: k for k, name in enumerate(class_names)}
    tags = np.zeros((len(ids), len(class_names)), np.float32)
    for i, names in enumerate(tag_names):
        tags[i, [position[t] for t in names.split("|")]] = 1.0
    return {"image_id": np.array(ids, dtype=object),
            "image": np.array(batch.column("image").to_pylist(), dtype=object),
            "tag_names": np.array(tag_names, dtype=object), "tags": tags,
            "gt_uri": np.array([join(gt, f"{i}.png") if gt else "" for i in ids], dtype=object),
            "key": np.array(batch.column("key").to_pylist(), dtype=object)}


def corpus_dataset(index: CorpusIndex, *, sample: bool = False, exclude: Any = None, include: Any = None,
                   gt: str | None = None, held_out: float = 0.0, only_held_out: bool = False) -> ray.data.Dataset:
    """The usable rows as pipeline rows: `image_id, image, tag_names` ('|'-joined), `tags`
    ([C] multi-hot), `gt_uri` (`<gt>/<image_id>.png`, '' without gt; a missing file means no
    ground truth) and `key`.

    sample: only the training sample. exclude / include: `committed_keys` refs; rows whose id
    is (not) among them are left out. held_out > 0: the rows of `held_out_rule(held_out)` are left
    out, or, with only_held_out, kept alone (the CAM network's held-out tags).
    """
    losers = None
    if index.duplicates_uri:
        losers = ray.put(read_table(index.duplicates_uri, columns=["row"]).column("row").to_numpy())
    threshold = bytes.fromhex(index.sample["threshold"]) if sample and index.sample.get("threshold") else None
    rows = parquet_dataset(index.rows_uri, name_prefix="part-")
    rows = rows.map_batches(_select, batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs=dict(
        losers=losers, threshold=threshold, exclude=exclude, include=include, held_out=held_out,
        only_held_out=only_held_out))
    return rows.map_batches(_pipeline_rows, batch_format="pyarrow", num_cpus=READ_CPUS,
                            fn_kwargs=dict(class_names=index.class_names, gt=gt))


def select(rows: ray.data.Dataset, *, include: Any = None, exclude: Any = None) -> ray.data.Dataset:
    """Pipeline rows (with `key`) whose id is (include) or is not (exclude) among committed keys."""
    return rows.map_batches(_select, batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs=dict(
        losers=None, threshold=None, exclude=exclude, include=include))


# --------------------------------------------------------------------------- the built-in corpus

BUILTIN_RECORD = "builtin.json"  # beside a built-in corpus: the (kind, seed, size) it was made with


def builtin_corpus(root: str, kind: str, config: Any) -> str:
    """The manifest of the built-in corpus `kind` (`data.CORPORA`) made with `config` under root:
    written where no corpus is, reused where `builtin.json` beside it records the same kind, seed
    and size (or, without a record, where the corpus is the one `config` makes: `_made_with`);
    otherwise a UserError, so that no job writes over the corpus of another run (whose rows,
    labels and checkpoints would stay behind, no longer matching the images)."""
    record = {"kind": kind, "seed": config.seed, "num_images": config.num_images}
    manifest, saved = join(root, "manifest.parquet"), join(root, BUILTIN_RECORD)
    found = json.loads(read_bytes(saved)) if exists(saved) else None
    if found is None and exists(manifest):  # written before the record was kept, or not built in
        if not _made_with(root, config):
            raise UserError(f"{root} holds a corpus that is not the built-in corpus {_described(record)}; "
                            f"pass --input {manifest} to use it, or another --output")
        found = record
        write_bytes(saved, json.dumps(record).encode())
    if found is not None and found != record:
        raise UserError(f"{root} holds the built-in corpus {_described(found)}, not {_described(record)}: "
                        "pass the options it was made with (--corpus, --seed, --synthetic-images) or another --output")
    if found is None:
        write_bytes(saved, json.dumps(record).encode())  # first: an interrupted write is redone the same
    if not exists(manifest):
        write_corpus(root, config)  # writes the manifest last
    return manifest


def _made_with(root: str, config: Any) -> bool:
    """Whether the corpus under root is the one `config` makes: as many rows, and its first image
    the same bytes (each image is drawn from the corpus kind, its seed and its index alone)."""
    if read_table(join(root, "manifest.parquet"), columns=["image_id"]).num_rows != config.num_images:
        return False
    with tempfile.TemporaryDirectory() as first:
        write_corpus(first, replace(config, num_images=1))
        [name] = os.listdir(os.path.join(first, "images"))
        ours = join(root, "images", name)
        with open(os.path.join(first, "images", name), "rb") as f:
            return exists(ours) and read_bytes(ours) == f.read()


def _described(record: dict[str, Any]) -> str:
    return f"{record['kind']!r} ({record['num_images']} images, seed {record['seed']})"
