"""The corpus as Ray Data streams it: the manifest validated once into `<output>/rows/`, then read
by every stage as Parquet tables (`datasources.parquet_dataset`). Nothing on the driver grows
with the corpus but the first 8 bytes of each row's key while duplicates and the training sample
are found (80 MB at 10M rows), and the 16-byte keys of committed rows when a run resumes.

- `prepare_corpus` (once per output; a rerun reuses it): Ray Data reads the manifest's parts
  (`datasources.ManifestDatasource`: Parquet row groups, JSONL/CSV files, local or s3://) and
  checks each row in its read task (`io.checked_rows`: `io.rows.plain_rows` with Arrow kernels,
  `check_record` for the rows that need more); `staging.CorpusSink` writes the usable rows to
  `rows/part-<first row>.parquet` and the rejected ones to `errors/manifest-<first row>.parquet`.
  The rows' key prefixes (`io.keys`) then give the duplicate ids (rows of a repeated
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

import json
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from psa_ray.io.classes import resolve_classes
from psa_ray.io.keys import (
    KEY, key_array, key_column, key_prefixes, kept_keys, repeated_values, training_sample, unique_sorted)
from psa_ray.io.manifest import manifest_base, manifest_parts
from psa_ray.io.rows import CorpusRow, ManifestError, RowError, absolute_base, all_rejected_message, duplicate_error
from psa_ray.io.storage import exists, join, list_files, read_bytes, remove_tree, write_bytes
from psa_ray.io.voc import voc_root
from psa_ray.pipeline.datasources import READ_CPUS, ManifestDatasource, parquet_dataset
from psa_ray.pipeline.ray_types import batch_fn
from psa_ray.pipeline.staging import CorpusSink, stage_voc
from psa_ray.pipeline.writers import error_table, read_table, table_rows, write_table
from psa_ray.pipeline.layout import OutputLayout

CORPUS_FILE = "_corpus.json"
DUPLICATES_FILE = "manifest-duplicates.parquet"  # in errors/


@dataclass(frozen=True)
class CorpusIndex:
    """What `prepare_corpus` found: enough for every stage to build its Dataset."""

    rows_uri: str                 # <output>/rows: the usable rows, Parquet
    class_names: list[str]
    num_rows: int                 # usable rows (duplicates not counted)
    num_errors: int               # rejected manifest rows, duplicates included
    duplicates_uri: str | None    # errors/manifest-duplicates.parquet, if any
    sample: dict[str, Any] = field(default_factory=dict)  # size, rule, threshold (hex key)


# --------------------------------------------------------------------------- keys on the driver

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
    return _collect(ds, count, np.uint64, key_prefixes)


def collect_keys(ds: ray.data.Dataset, count: int) -> np.ndarray:
    """All `key` values, sorted (16 bytes a row)."""
    return _collect(ds, count, KEY, key_column)


def _with_keys(batch: pa.Table) -> pa.Table:
    return pa.table({"key": key_array(batch.column("image_id").to_pylist())})


def _not_manifest(batch: pa.Table) -> pa.Table:
    return batch.filter(pa.compute.not_equal(batch.column("stage"), "manifest"))


def committed_keys(tables: str | None, errors: str | None = None) -> Any:
    """An object ref to the sorted keys of the image ids committed in the Parquet tables under
    `tables` (shards/, index/seeds/; None: none) and, if given, the non-manifest rows of
    `errors`; None if there are none. Read with Ray Data; the driver holds 16 bytes a committed
    row. The one resume rule of every job (labeling, prediction)."""
    keys = []
    for prefix, columns in ((tables, ["image_id"]), (errors, ["image_id", "stage"])):
        if not prefix:
            continue
        ds = parquet_dataset(prefix, columns=columns)
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

def _duplicates(rows: ray.data.Dataset, prefixes: np.ndarray) -> tuple[list[RowError], np.ndarray]:
    """Error rows of the usable rows whose id an earlier row keeps, and their `row` numbers. The
    rows whose key prefix repeats are fetched and compared by id (a shared prefix of two ids is
    a candidate, not a duplicate)."""
    repeated = repeated_values(prefixes)
    if repeated.size == 0:
        return [], np.zeros(0, np.int64)
    ref = ray.put(repeated)

    def candidates(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(np.isin(key_prefixes(batch), ray.get(ref))))

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


def prepare_corpus(input_uri: str, output: str, classes: str | None = None,
                   train_images: int = 0) -> CorpusIndex:
    """Validate the manifest (or VOC folder) into `<output>/rows/` once; see the module docstring.

    Raises ManifestError, with nothing left in the output, for problems with the input as a
    whole: unreadable, missing columns, no class names, no usable row.
    """
    rows_uri = OutputLayout(output).rows
    marker = join(rows_uri, CORPUS_FILE)
    if exists(marker):
        index = CorpusIndex(**json.loads(read_bytes(marker)))
        if train_images and index.sample.get("train_images") != train_images:
            prefixes = collect_prefixes(_parts(rows_uri, ["key"]), table_rows(rows_uri, name_prefix="part-"))
            index = replace(index, sample=training_sample(unique_sorted(prefixes), train_images))
            write_bytes(marker, json.dumps(asdict(index), indent=2).encode())
        return index
    created = not exists(output)
    remove_tree(rows_uri)  # an earlier run stopped before it was complete
    if voc_root(input_uri) is not None:
        names = stage_voc(input_uri, classes, rows_uri)
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
    prefixes = collect_prefixes(_parts(rows_uri, ["key"]), count)
    dup_errors, losers = _duplicates(rows, prefixes)
    if dup_errors:  # no second copy of a corpus without duplicates
        prefixes = unique_sorted(prefixes)
    duplicates_uri = None
    if dup_errors:
        duplicates_uri = join(OutputLayout(output).errors, DUPLICATES_FILE)
        write_table(duplicates_uri, error_table([e.to_dict() for e in dup_errors]).append_column(
            "row", pa.array(losers, pa.int64())))
    for uri in list_files(rows_uri, suffix=".parquet"):  # the rejected rows join errors/
        name = posixpath.basename(uri)
        if name.startswith("rejected-"):
            write_bytes(join(OutputLayout(output).errors, "manifest-" + name[len("rejected-"):]), read_bytes(uri))
    index = CorpusIndex(rows_uri=rows_uri, class_names=names, num_rows=count - len(losers),
                        num_errors=table_rows(OutputLayout(output).errors, name_prefix="manifest-"),
                        duplicates_uri=duplicates_uri,
                        sample=training_sample(prefixes, train_images) if train_images else {})
    write_bytes(marker, json.dumps(asdict(index), indent=2).encode())
    return index


def _parts(rows_uri: str, columns: list[str] | None = None) -> ray.data.Dataset:
    """The `part-` files of a prepared corpus as a Dataset: there are some (`prepare_corpus` keeps
    no corpus without a usable row)."""
    parts = parquet_dataset(rows_uri, columns, name_prefix="part-")
    if parts is None:
        raise RuntimeError(f"{rows_uri} holds no part- files")
    return parts


def _all_rejected(input_uri: str, rows_uri: str) -> str:
    """The ManifestError message for a manifest none of whose rows is usable."""
    files = [f for f in list_files(rows_uri, suffix=".parquet") if posixpath.basename(f).startswith("rejected-")]
    if not files:
        return f"no rows in {input_uri}"
    codes: Counter[str] = Counter()
    for uri in files:
        counts = read_table(uri, columns=["error"]).column("error").value_counts()
        codes.update({c["values"]: c["counts"] for c in counts.to_pylist()})
    first = read_table(files[0], columns=["message"]).column("message")[0].as_py()
    return all_rejected_message(sum(codes.values()), codes, first, input_uri)


# --------------------------------------------------------------------------- the rows of a stage

def _select(batch: pa.Table, *, losers: Any, threshold: bytes | None, exclude: Any,
            include: Any, held_out: float = 0.0, only_held_out: bool = False) -> pa.Table:
    """The rows of a batch (with `key`) that pass the filters of `corpus_dataset` / `select`
    (`io.keys.kept_keys`; losers: the `row` numbers of duplicates). losers, exclude and include
    are object refs."""
    keep = kept_keys(key_column(batch), threshold=threshold, exclude=None if exclude is None else ray.get(exclude),
                     include=None if include is None else ray.get(include), held_out=held_out,
                     only_held_out=only_held_out)
    if losers is not None:
        keep &= ~np.isin(batch.column("row").to_numpy(), ray.get(losers))
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
    is (not) among them are left out. held_out > 0: the rows of `io.keys.held_out_rule(held_out)`
    are left out, or, with only_held_out, kept alone (the CAM network's held-out tags).
    """
    losers = None
    if index.duplicates_uri:
        losers = ray.put(read_table(index.duplicates_uri, columns=["row"]).column("row").to_numpy())
    threshold = bytes.fromhex(index.sample["threshold"]) if sample and index.sample.get("threshold") else None
    rows = _parts(index.rows_uri)
    rows = rows.map_batches(batch_fn(_select), batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs=dict(
        losers=losers, threshold=threshold, exclude=exclude, include=include, held_out=held_out,
        only_held_out=only_held_out))
    return rows.map_batches(batch_fn(_pipeline_rows), batch_format="pyarrow", num_cpus=READ_CPUS,
                            fn_kwargs=dict(class_names=index.class_names, gt=gt))


def select(rows: ray.data.Dataset, *, include: Any = None, exclude: Any = None) -> ray.data.Dataset:
    """Pipeline rows (with `key`) whose id is (include) or is not (exclude) among committed keys."""
    return rows.map_batches(batch_fn(_select), batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs=dict(
        losers=None, threshold=None, exclude=exclude, include=include))

