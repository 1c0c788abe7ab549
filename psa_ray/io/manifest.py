"""Manifests (stable interface): the file formats and the checks every input row goes through
(`io.inputs` reads manifests and PASCAL VOC folders with them; `io.voc` the VOC part).

Manifest: `.parquet`, `.jsonl` or `.csv` with columns `image_id` (unique string, used in output
file names), `image` (s3:// URI, absolute path, or path relative to the manifest's folder) and
`tags` (class names: list<string> in Parquet, a JSON list in JSONL, `|`-separated in CSV).
Class names: `classes=` or `classes.txt` beside the manifest (one per line, no background).

Rows that cannot be used are dropped and reported as RowError (stage "manifest") with one of
these codes: `bad_row` (a JSONL line that is not a JSON object), `bad_id` (empty, not a string,
longer than MAX_ID_BYTES, beginning with `.` (a hidden file) or holding `/`, `\\`, `..` or a
control character: ids become file names), `duplicate_id` (the first row with an id keeps it;
ids are compared after stripping spaces), `missing_image`, `bad_image` (not a string, an
unsupported URI scheme, or an s3:// URI without a valid bucket and key, e.g. with credentials in
it), `bad_tags` (not a list of strings), `no_tags`, `unknown_tag`, and for VOC
`missing_annotation` / `bad_annotation`. Problems with the manifest as a whole raise
ManifestError. Messages and error rows are redacted (`io.redact`).
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from psa_ray.errors import UserError
from psa_ray.io.redact import redact
from psa_ray.io.storage import (FILE_SCHEME, S3_SCHEME, exists, filesystem, join, list_files, parent, read_bytes,
                                s3_bucket_and_key, with_retries, write_bytes)

MANIFEST_FORMATS = ("parquet", "jsonl", "csv")
CSV_TAG_SEPARATOR = "|"
MAX_CLASSES = 254  # labels are uint8: 0 background, 1..C classes, 255 ignore
# Output names are `<image_id>.png`, written through a `.<name>.<32 hex>.tmp` file: 200 bytes keep
# both under the usual 255-byte file name limit.
MAX_ID_BYTES = 200
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")

ERROR_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.string()), ("stage", pa.string()),
                          ("error", pa.string()), ("message", pa.string())])


class ManifestError(UserError):
    """The corpus as a whole cannot be read (the message names the problem and the file)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


@dataclass
class RowError:
    """One rejected input row; the columns of errors/*.parquet (ERROR_SCHEMA)."""

    image_id: str
    image: str
    stage: str
    error: str    # a short code
    message: str  # for people

    def __post_init__(self) -> None:
        self.image_id = _valid_utf8(self.image_id)
        self.image, self.message = redact(_valid_utf8(self.image)), redact(_valid_utf8(self.message))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _valid_utf8(text: str) -> str:
    """text with lone surrogates (possible in JSON) spelled out as `\\udxxx`: Parquet needs UTF-8."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class CorpusRow:
    image_id: str
    image: str       # s3:// URI or absolute local path
    tags: list[str]  # class names, each in Corpus.class_names


@dataclass
class Corpus:
    rows: list[CorpusRow]
    class_names: list[str]  # label k (1..C) is class_names[k - 1]; 0 is background

    def tag_vector(self, row: CorpusRow) -> np.ndarray:
        """[C] float32 multi-hot of row.tags in class_names order."""
        vector = np.zeros(len(self.class_names), np.float32)
        vector[[self.class_names.index(t) for t in row.tags]] = 1.0
        return vector


class RowProblem(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- class names

def read_text(uri: str, what: str, endpoint_url: str | None) -> str:
    try:
        return read_bytes(uri, endpoint_url).decode("utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{what} not found: {uri}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{what} {uri} is not UTF-8 text") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{what} {uri} is unreadable: {e}") from None


def _is_file_reference(classes: str) -> bool:
    return (classes.startswith((S3_SCHEME, FILE_SCHEME)) or classes.endswith(".txt")
            or os.path.isfile(classes))


def resolve_classes(classes: list[str] | str | None, manifest_uri: str,
                    endpoint_url: str | None = None) -> list[str]:
    """Class names from a list, a classes.txt path/URI, a comma-separated string, or (None)
    classes.txt beside the manifest. Blank entries are ignored; raises ManifestError."""
    if classes is None:
        source = join(parent(manifest_uri), "classes.txt")
        if not exists(source, endpoint_url):
            raise ManifestError(f"no class names for {manifest_uri}: put a classes.txt beside it "
                                "(one name per line) or pass classes")
        names = read_text(source, f"classes file for {manifest_uri}", endpoint_url).splitlines()
    elif isinstance(classes, str) and _is_file_reference(classes):
        source = classes
        names = read_text(source, f"classes file for {manifest_uri}", endpoint_url).splitlines()
    else:
        source = "the classes option"
        names = classes.split(",") if isinstance(classes, str) else list(classes)
    names = [str(n).strip() for n in names if n is not None and str(n).strip()]
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    problem = None
    if not names:
        problem = "no class names"
    elif duplicates:
        problem = f"duplicate class names {', '.join(duplicates)}"
    elif any(n.lower() == "background" for n in names):
        problem = "'background' is listed; leave it out (label 0 is background)"
    elif any(CSV_TAG_SEPARATOR in n for n in names):
        problem = f"class names must not contain '{CSV_TAG_SEPARATOR}'"
    elif len(names) > MAX_CLASSES:
        problem = f"{len(names)} classes; at most {MAX_CLASSES} fit uint8 labels"
    if problem:
        raise ManifestError(f"{problem} in {source} (for {manifest_uri})")
    return names


# --------------------------------------------------------------------------- manifest formats

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
    base_row = part.file_index * ROW_STRIDE
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


# --------------------------------------------------------------------------- row validation

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
    base_row = part.file_index * ROW_STRIDE
    for record, row in zip(records, file_rows.tolist()):
        record.update(row=base_row + row, where=f"{part.label}row {row + 1}")
    return records


# Printable ASCII with nothing for str.strip() to take; and what os.path.normpath would change in a
# relative path (or what makes it no relative path).
_PLAIN_TEXT = r"^[!-~]([ -~]*[!-~])?$"
_NOT_NORMAL_PATH = r"(^|/)\.{1,2}(/|$)|//|^/|/$|://"


def plain_rows(table: pa.Table, class_names: list[str], base: str) -> np.ndarray:
    """Mask (n,) of the rows of an (image_id, image, tags) table that `check_record` accepts
    unchanged, their image resolving to `base.rstrip("/") + "/" + image` (base absolute):
    printable ASCII id and image with nothing to strip, an id of at most MAX_ID_BYTES not beginning
    with '.' and without '/', '\\' or '..', a relative image path that is already normal, and tags
    that are known class names, none repeated. Found with Arrow kernels (the common case, at a fraction of
    check_record's cost); every other row goes through check_record."""
    ids, images, tags = (table.column(name) for name in ("image_id", "image", "tags"))
    if not (_resolve_image("x", base) == base.rstrip("/") + "/x"
            and pa.types.is_string(ids.type) and pa.types.is_string(images.type)
            and pa.types.is_list(tags.type) and pa.types.is_string(tags.type.value_type)):
        return np.zeros(table.num_rows, bool)
    ok = pc.and_kleene(pc.match_substring_regex(ids, _PLAIN_TEXT), pc.less_equal(pc.binary_length(ids), MAX_ID_BYTES))
    for bad in ("/", "\\", ".."):
        ok = pc.and_kleene(ok, pc.invert(pc.match_substring(ids, bad)))
    ok = pc.and_kleene(ok, pc.invert(pc.starts_with(ids, ".")))
    ok = pc.and_kleene(ok, pc.match_substring_regex(images, _PLAIN_TEXT))
    ok = pc.and_kleene(ok, pc.invert(pc.match_substring_regex(images, _NOT_NORMAL_PATH)))
    ok = pc.and_kleene(ok, pc.greater(pc.list_value_length(tags), 0))
    plain: np.ndarray = ok.fill_null(False).to_numpy(zero_copy_only=False)
    tags = tags.combine_chunks()
    flat, parents = pc.list_flatten(tags), pc.list_parent_indices(tags).to_numpy()
    index = pc.index_in(flat, value_set=pa.array(class_names, pa.string())).fill_null(-1).to_numpy()
    plain[parents[index < 0]] = False   # an unknown, null or unstripped tag
    codes = np.sort(parents.astype(np.int64) * (len(class_names) + 1) + index)
    plain[(codes[1:][codes[1:] == codes[:-1]] // (len(class_names) + 1))] = False   # a repeated tag
    return plain


def id_problem(image_id: Any) -> str | None:
    if not isinstance(image_id, str):
        return "image_id is missing" if image_id is None else f"image_id must be a string, got {image_id!r}"
    image_id = image_id.strip()  # the id used is the stripped one
    if not image_id:
        return "image_id is empty"
    if _valid_utf8(image_id) != image_id:
        return f"image_id {image_id!r} is not valid Unicode text"
    size = len(image_id.encode("utf-8"))
    if size > MAX_ID_BYTES:
        return f"image_id is {size} bytes long, more than {MAX_ID_BYTES} (it becomes a file name)"
    for bad, what in (("/", "'/'"), ("\\", "'\\'"), ("..", "'..'")):
        if bad in image_id:
            return f"image_id {image_id!r} contains {what} (it becomes a file name)"
    if image_id.startswith("."):
        return f"image_id {image_id!r} begins with '.' (its label would be a hidden file, which ls and globs skip)"
    if _CONTROL_CHARACTER.search(image_id):
        return f"image_id {image_id!r} contains a control character (it becomes a file name)"
    return None


def _resolve_image(image: object, base: str) -> str:
    """An absolute URI/path for a row's image field; base is the manifest's folder."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise RowProblem("missing_image", "image is missing")
    if not isinstance(image, str):
        raise RowProblem("bad_image", f"image must be a string, got {image!r}")
    if _valid_utf8(image) != image:
        raise RowProblem("bad_image", f"image {image!r} is not valid Unicode text")
    image = image.strip()
    if image.startswith(S3_SCHEME):
        try:
            key = s3_bucket_and_key(image)[1]
        except ValueError as e:
            raise RowProblem("bad_image", str(e)) from None
        if not key.strip("/"):
            raise RowProblem("bad_image", f"no object key in {image!r}")
        return image
    if image.startswith(FILE_SCHEME):
        return os.path.normpath(image[len(FILE_SCHEME):])
    if "://" in image:
        raise RowProblem("bad_image", f"unsupported URI scheme in {image!r} (use s3:// or a path)")
    if os.path.isabs(image):
        return os.path.normpath(image)
    if base.startswith(S3_SCHEME):
        return S3_SCHEME + posixpath.normpath(posixpath.join(base[len(S3_SCHEME):], image))
    return os.path.normpath(os.path.join(base, image))


def _clean_tags(tags: Any, known: set[str]) -> list[str]:
    if tags is None:
        raise RowProblem("no_tags", "tags are missing")
    if not isinstance(tags, list) or not all(t is None or isinstance(t, str) for t in tags):
        raise RowProblem("bad_tags", f"tags must be a list of class names, got {tags!r}"[:200])
    names = list(dict.fromkeys(t.strip() for t in tags if t is not None and t.strip()))
    if not names:
        raise RowProblem("no_tags", "no tags (every image needs at least one class)")
    unknown = [t for t in names if t not in known]
    if unknown:
        raise RowProblem("unknown_tag", f"unknown tag(s) {', '.join(map(repr, unknown))}")
    return names


def check_record(record: dict[str, Any], class_names: list[str] | None, known: set[str],
                 base: str) -> CorpusRow | RowError:
    """One record (image_id, image, tags, where; see part_records) as a usable row or the reason
    it is not; duplicate ids are not checked here (see `duplicate_problem`). base is absolute.

    class_names None means untagged images (e.g. for prediction): tags are not read and come out
    empty.
    """
    if "rejected" in record:  # not a record at all (a JSONL line that is no object)
        rejected: RowError = record["rejected"]
        return rejected
    raw_id, raw_image = record["image_id"], record["image"]
    try:
        problem = id_problem(raw_id)
        if problem:
            raise RowProblem("bad_id", problem)
        if "problem" in record:  # found while reading it (VOC: its annotation)
            raise record["problem"]
        image = _resolve_image(raw_image, base)
        tags = [] if class_names is None else _clean_tags(record["tags"], known)
        return CorpusRow(raw_id.strip(), image, tags)
    except RowProblem as p:
        return RowError("" if raw_id is None else str(raw_id), "" if raw_image is None else str(raw_image),
                        "manifest", p.code, f"{record['where']}: {p}")


def duplicate_error(row: CorpusRow, where: str, keeper_where: str) -> RowError:
    """The error row of a usable row whose id an earlier row (at keeper_where) keeps."""
    return RowError(row.image_id, row.image, "manifest", "duplicate_id",
                    f"{where}: image_id {row.image_id!r} already used by an earlier row ({keeper_where})")


def id_key(image_id: str) -> bytes:
    """A 16-byte digest of an image id: the key of joins, duplicate checks and sampling."""
    return hashlib.blake2b(image_id.encode("utf-8"), digest_size=16).digest()


def validate_records(records: Iterable[dict[str, Any]], class_names: list[str] | None,
                     base: str) -> tuple[list[CorpusRow], list[RowError]]:
    """Rows that pass every check, and one RowError for each record that does not (in order).

    Of the rows that pass, the first with an id keeps it; later ones are `duplicate_id` errors.
    """
    known, base = set(class_names or ()), absolute_base(base)
    rows: list[CorpusRow] = []
    errors: list[RowError] = []
    seen: dict[str, str] = {}
    for record in records:
        checked = check_record(record, class_names, known, base)
        if isinstance(checked, CorpusRow):
            if checked.image_id in seen:
                checked = duplicate_error(checked, record["where"], seen[checked.image_id])
            else:
                seen[checked.image_id] = record["where"]
                rows.append(checked)
                continue
        errors.append(checked)
    return rows, errors


def absolute_base(base: str) -> str:
    """A manifest's folder as images resolve against it (local folders made absolute)."""
    return base if base.startswith(S3_SCHEME) else os.path.abspath(base)


def usable_corpus(rows: list[CorpusRow], errors: list[RowError], class_names: list[str],
            uri: str) -> tuple[Corpus, list[RowError]]:
    if not rows and not errors:
        raise ManifestError(f"no rows in {uri}")
    if not rows:
        raise ManifestError(all_rejected_message(len(errors), Counter(e.error for e in errors),
                                                 errors[0].message, uri))
    return Corpus(rows=rows, class_names=class_names), errors


def all_rejected_message(count: int, codes: Counter[str], first: str, uri: str) -> str:
    listed = ", ".join(f"{code}: {n}" for code, n in codes.most_common())
    return f"all {count} rows of {uri} were rejected ({listed}); first: {first}"


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


# --------------------------------------------------------------------------- entry points

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


def write_classes(class_names: Sequence[str], uri: str, endpoint_url: str | None = None) -> None:
    """classes.txt: one name per line."""
    write_bytes(uri, "".join(f"{n}\n" for n in class_names).encode(), endpoint_url)
