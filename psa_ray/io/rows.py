"""A corpus's rows (stable interface): a usable row (CorpusRow, in a Corpus), a rejected one
(RowError), and the rules every input row is checked by.

Rows that cannot be used are dropped and reported as RowError (stage "manifest") with one of
these codes: `bad_row` (a JSONL line that is not a JSON object), `bad_id` (empty, not a string,
longer than MAX_ID_BYTES, beginning with `.` (a hidden file) or holding `/`, `\\`, `..` or a
control character: ids become file names), `duplicate_id` (the first row with an id keeps it;
ids are compared after stripping spaces), `missing_image`, `bad_image` (not a string, an
unsupported URI scheme, or an s3:// URI without a valid bucket and key, e.g. with credentials in
it), `bad_tags` (not a list of strings), `no_tags`, `unknown_tag`, and for VOC
`missing_annotation` / `bad_annotation`. Problems with the input as a whole raise ManifestError.
Messages and error rows are redacted (`io.redact`).

The rules are written once, in `check_record` (a row at a time). `plain_rows` finds with Arrow
kernels the rows that check_record accepts unchanged: it asks that nothing be left to normalise
(spaces, paths, repeated tags) and applies the same id rules (ID_RULES, MAX_ID_BYTES), image
resolution (`_resolve_image`) and class names.
"""
from __future__ import annotations

import os
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from psa_ray.errors import UserError
from psa_ray.io.redact import redact
from psa_ray.io.storage import FILE_SCHEME, S3_SCHEME, s3_bucket_and_key

# Output names are `<image_id>.png`, written through a `.<name>.<32 hex>.tmp` file: 200 bytes keep
# both under the usual 255-byte file name limit.
MAX_ID_BYTES = 200
# What an image id (stripped, it becomes a file name) must not match, and why: searched in one id
# by `id_problem` (Python's re; the first rule broken names the problem) and in a column by
# `plain_rows` (Arrow's RE2), both through one pattern of them all (_ANY_ID_RULE).
ID_RULES = (
    (r"/", "contains '/' (it becomes a file name)"),
    (r"\\", "contains '\\' (it becomes a file name)"),
    (r"\.\.", "contains '..' (it becomes a file name)"),
    (r"^\.", "begins with '.' (its label would be a hidden file, which ls and globs skip)"),
    (r"[\x00-\x1f\x7f]", "contains a control character (it becomes a file name)"),
)
_ANY_ID_RULE = "|".join(f"(?:{pattern})" for pattern, _ in ID_RULES)
_ANY_ID_RULE_RE = re.compile(_ANY_ID_RULE)
_ID_PATTERNS = [(re.compile(pattern), why) for pattern, why in ID_RULES]

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


# --------------------------------------------------------------------------- the rules, a row at a time

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
    if _ANY_ID_RULE_RE.search(image_id):
        why = next(why for pattern, why in _ID_PATTERNS if pattern.search(image_id))
        return f"image_id {image_id!r} {why}"
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


def absolute_base(base: str) -> str:
    """A manifest's folder as images resolve against it (local folders made absolute)."""
    return base if base.startswith(S3_SCHEME) else os.path.abspath(base)


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
    """One record (image_id, image, tags, where; see `io.manifest.part_records`) as a usable row
    or the reason it is not; duplicate ids are not checked here (see `duplicate_error`). base is
    absolute.

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


# --------------------------------------------------------------------------- the rules, a column at a time

# Printable ASCII with nothing for str.strip() to take; and what os.path.normpath would change in a
# relative path (or what makes it no relative path).
_PLAIN_TEXT = r"^[!-~]([ -~]*[!-~])?$"
_NOT_NORMAL_PATH = r"(^|/)\.{1,2}(/|$)|//|^/|/$|://"


def plain_rows(table: pa.Table, class_names: list[str], base: str) -> np.ndarray:
    """Mask (n,) of the rows of an (image_id, image, tags) table that `check_record` accepts
    unchanged, their image resolving to `base.rstrip("/") + "/" + image` (base absolute):
    printable ASCII id and image with nothing to strip, an id of at most MAX_ID_BYTES that breaks
    none of ID_RULES, a relative image path that is already normal, and tags that are known class
    names, none repeated. Found with Arrow kernels (the common case, at a fraction of
    check_record's cost); every other row goes through check_record."""
    ids, images, tags = (table.column(name) for name in ("image_id", "image", "tags"))
    if not (_resolve_image("x", base) == base.rstrip("/") + "/x"
            and pa.types.is_string(ids.type) and pa.types.is_string(images.type)
            and pa.types.is_list(tags.type) and pa.types.is_string(tags.type.value_type)):
        return np.zeros(table.num_rows, bool)
    ok = pc.and_kleene(pc.match_substring_regex(ids, _PLAIN_TEXT), pc.less_equal(pc.binary_length(ids), MAX_ID_BYTES))
    ok = pc.and_kleene(ok, pc.invert(pc.match_substring_regex(ids, _ANY_ID_RULE)))
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


# --------------------------------------------------------------------------- a corpus of checked rows

def duplicate_error(row: CorpusRow, where: str, keeper_where: str) -> RowError:
    """The error row of a usable row whose id an earlier row (at keeper_where) keeps."""
    return RowError(row.image_id, row.image, "manifest", "duplicate_id",
                    f"{where}: image_id {row.image_id!r} already used by an earlier row ({keeper_where})")


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
