"""Bytes in and out of local paths and `s3://` URIs through one code path (pyarrow.fs).

A URI is either `s3://bucket/key`, `file:///abs/path`, or a plain local path (relative paths are
made absolute). The S3 endpoint comes from `endpoint_url`, else `AWS_ENDPOINT_URL_S3`, else
`AWS_ENDPOINT_URL` (unset in production: AWS itself); credentials come from the usual AWS
environment variables / default chain. Transient failures (S3 throttling, 5xx, dropped
connections; on local/network mounts EIO, ETIMEDOUT, EAGAIN, ...) are retried with exponential
backoff (`RETRY_POLICY`), on top of the AWS SDK's own 3 attempts per request; a missing object
raises FileNotFoundError at once.
"""
from __future__ import annotations

import errno
import os
import posixpath
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TypeVar

import pyarrow.fs as pafs

from psa_ray.io.redact import redact

T = TypeVar("T")

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient storage errors: attempt k (from 0) sleeps
    `min(max_delay, base_delay * 2**k)` times a random factor in [0.5, 1] before attempt k + 1."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")


RETRY_POLICY = RetryPolicy()

# Substrings of pyarrow/AWS SDK error messages that mark a failure worth retrying.
TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "SLOW_DOWN", "SlowDown", "INTERNAL_FAILURE", "InternalError",
                     "SERVICE_UNAVAILABLE", "ServiceUnavailable", "RequestTimeout", "REQUEST_TIMEOUT",
                     "Throttl", "THROTTL", "Connection reset", "timed out")
_TRANSIENT_STATUS = re.compile(r"(?i)\b(?:http(?: status)?|status(?: code)?)[:= ]*(?:429|500|502|503|504)\b")
# errno values of local and network-mounted (NFS, FUSE: s3fs, gcsfuse, mountpoint-s3) files that a
# retry may cure; FUSE S3 mounts report backend failures as EIO.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.ESTALE})

# Any S3 bucket name, legacy us-east-1 names (capitals, '_', up to 255 characters) included.
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")

_cache: dict[tuple[str, str | None], pafs.FileSystem] = {}
_cache_lock = threading.Lock()


def is_transient(error: BaseException) -> bool:
    """True for an OSError that a retry may cure (throttling, 5xx, dropped connections, the
    errnos in TRANSIENT_ERRNOS)."""
    if not isinstance(error, OSError) or isinstance(error, (FileNotFoundError, PermissionError)):
        return False
    if error.errno in TRANSIENT_ERRNOS:
        return True
    message = str(error)
    return any(m in message for m in TRANSIENT_MARKERS) or bool(_TRANSIENT_STATUS.search(message))


def with_retries(call: Callable[[], T]) -> T:
    """`call()`, retried under RETRY_POLICY while it raises a transient error."""
    policy = RETRY_POLICY
    for attempt in range(policy.attempts):
        try:
            return call()
        except OSError as e:
            if attempt == policy.attempts - 1 or not is_transient(e):
                raise
            delay = min(policy.max_delay, policy.base_delay * 2 ** attempt)
            policy.sleep(delay * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def s3_endpoint(override: str | None) -> str | None:
    """The S3 endpoint: override, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (None: AWS)."""
    return (override or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def _s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {"allow_delayed_open": True}  # small writes become one PutObject
    if endpoint:
        scheme, sep, host = endpoint.rstrip("/").partition("://")
        if sep:
            kwargs.update(scheme=scheme, endpoint_override=host)
        else:
            kwargs["endpoint_override"] = endpoint.rstrip("/")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_bucket_and_key(uri: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key` (the key may be empty). ValueError, redacted, for a
    bucket name no S3 bucket can have (e.g. `s3://KEY:SECRET@bucket/...`)."""
    bucket, _, object_key = uri[len(S3_SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"no valid bucket in S3 URI {redact(uri)!r} (bucket names hold only letters, "
                         "digits, '.', '-' and '_'; credentials do not belong in URIs)")
    return bucket, object_key


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it without scheme) for a local path or an s3:// URI.

    Filesystems are cached per (scheme, endpoint) for the life of the process.
    """
    if uri.startswith(S3_SCHEME):
        key: tuple[str, str | None] = ("s3", s3_endpoint(endpoint_url))
        bucket, object_key = s3_bucket_and_key(uri)
        path = f"{bucket}/{object_key}".rstrip("/")
    elif "://" in uri and not uri.startswith(FILE_SCHEME):
        raise ValueError(f"unsupported URI scheme in {redact(uri)!r} (use s3:// or a local path)")
    else:
        key = ("file", None)
        path = os.path.abspath(uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _s3_filesystem(key[1]) if key[0] == "s3" else pafs.LocalFileSystem()
            _cache[key] = fs
    return fs, path


def join(base_uri: str, *parts: str) -> str:
    """`base_uri/part/...` with single slashes; keeps `s3://` (and `file://`) intact."""
    pieces = [base_uri.rstrip("/") or base_uri] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


class ObjectTooLargeError(ValueError):
    """A file/object larger than the reader's `max_bytes`."""


def read_bytes(uri: str, endpoint_url: str | None = None, *, max_bytes: int | None = None) -> bytes:
    """The whole object/file. FileNotFoundError if it does not exist; ObjectTooLargeError if it
    holds more than max_bytes (at most max_bytes + 1 bytes are read to find out)."""
    fs, path = filesystem(uri, endpoint_url)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            if max_bytes is None:
                whole: bytes = stream.read()
                return whole
            data: bytes = stream.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ObjectTooLargeError(f"{uri} holds more than the limit of {max_bytes} bytes")
        return data

    return with_retries(read)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write (replace) atomically: readers see the old content or the new, never a part.

    Local: a temp file in the same folder, then a rename (no fsync: atomic against crashes of
    the writer, not against power loss). S3: one PUT, atomic per object. Local parent folders
    are created.
    """
    fs, path = filesystem(uri, endpoint_url)

    def write_local() -> None:
        folder, name = os.path.split(path)
        fs.create_dir(folder, recursive=True)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            fs.move(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def put() -> None:
        with fs.open_output_stream(path) as out:
            out.write(data)

    with_retries(put if uri.startswith(S3_SCHEME) else write_local)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    """True if a file, or a folder / a prefix with objects under it, is there."""
    fs, path = filesystem(uri, endpoint_url)
    return bool(with_retries(lambda: fs.get_file_info(path).type) != pafs.FileType.NotFound)


def list_files(prefix_uri: str, suffix: str = "", endpoint_url: str | None = None) -> list[str]:
    """Sorted URIs of the files under a folder/prefix (recursive) whose names end in suffix.

    The URIs start with `prefix_uri` as given, so `join(prefix_uri, name)` equals the listed
    entry. A missing folder lists as empty.
    """
    fs, path = filesystem(prefix_uri, endpoint_url)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = with_retries(lambda: fs.get_file_info(selector))
    base = path.rstrip("/") + "/"
    return sorted(join(prefix_uri, info.path[len(base):]) for info in infos
                  if info.type == pafs.FileType.File and info.path.startswith(base)
                  and info.path.endswith(suffix))


def remove_tree(uri: str, endpoint_url: str | None = None) -> None:
    """Delete a folder/prefix and everything under it (nothing if it is not there)."""
    fs, path = filesystem(uri, endpoint_url)
    info = with_retries(lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory:
        with_retries(lambda: fs.delete_dir(path))
    elif info.type == pafs.FileType.File:
        with_retries(lambda: fs.delete_file(path))


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (Ray workers run in other folders); URIs (`s3://...`, `builtin:...`)
    and None unchanged."""
    return uri if uri is None or "://" in uri or uri.startswith("builtin:") else os.path.abspath(uri)


def parent(uri: str) -> str:
    """The folder/prefix holding uri (`s3://b/a/x.csv` -> `s3://b/a`)."""
    if uri.startswith(S3_SCHEME):
        return S3_SCHEME + posixpath.dirname(uri[len(S3_SCHEME):].rstrip("/"))
    return os.path.dirname(filesystem(uri)[1])
