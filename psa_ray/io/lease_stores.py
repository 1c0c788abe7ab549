"""Where an output's lease (`io.lease`) lives: a store that reads with a version and writes
only on that version. Local folders lock with `fcntl.flock`; `s3://` prefixes use S3's
conditional writes (If-None-Match / If-Match); a store in memory serves the unit tests.
Plain logic: no Ray."""
from __future__ import annotations

import os
import threading
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any, Protocol

from psa_ray.io.storage import S3_SCHEME, filesystem, join, s3_bucket_and_key, s3_endpoint

LEASE_FILE = "lease.json"
S3_SETTLE_S = 1.0


class LeaseStore(Protocol):
    """Where a lease lives: reads with a version, and writes that succeed only on that version."""

    def read(self) -> tuple[bytes | None, Any]:
        """(content, version); (None, None) when there is no lease."""

    def create(self, data: bytes) -> bool:
        """Write data if there is no lease; False if there is one."""

    def replace(self, data: bytes, version: Any) -> bool:
        """Write data if the lease is still at `version`; False otherwise."""

    def delete(self, version: Any) -> None:
        """Remove the lease if it is still at `version`."""

    settle_s: float


class MemoryStore:
    """A lease store in memory (unit tests); versions count writes."""

    settle_s = 0.0

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.version = 0
        self._lock = threading.Lock()

    def read(self) -> tuple[bytes | None, Any]:
        with self._lock:
            return self.data, (self.version if self.data is not None else None)

    def create(self, data: bytes) -> bool:
        with self._lock:
            if self.data is not None:
                return False
            self.data, self.version = data, self.version + 1
            return True

    def replace(self, data: bytes, version: Any) -> bool:
        with self._lock:
            if self.data is None or self.version != version:
                return False
            self.data, self.version = data, self.version + 1
            return True

    def delete(self, version: Any) -> None:
        with self._lock:
            if self.data is not None and self.version == version:
                self.data = None


class LocalStore:
    """`<folder>/lease.json`; every operation under an exclusive flock on `lease.json.lock`, the
    content itself as the version. The release removes the lock file too, and the folder if the
    lease made it and nothing else was written there (a job refused at its start leaves nothing)."""

    settle_s = 0.0

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LEASE_FILE)
        self.lock_path = self.path + ".lock"
        self.made_folder = not os.path.exists(folder)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        while True:
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except (FileNotFoundError, FileExistsError):  # the folder removed meanwhile (`delete`)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # the lock file may have been removed (`delete`) while we waited: lock the new one
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
                except FileNotFoundError:
                    same = False
                if same:
                    yield
                    return
            finally:
                os.close(fd)  # releases the flock

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write(self, data: bytes) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def read(self) -> tuple[bytes | None, Any]:
        with self._locked():
            data = self._read()
        return data, data

    def create(self, data: bytes) -> bool:
        with self._locked():
            if self._read() is not None:
                return False
            self._write(data)
            return True

    def replace(self, data: bytes, version: Any) -> bool:
        with self._locked():
            if self._read() != version or version is None:
                return False
            self._write(data)
            return True

    def delete(self, version: Any) -> None:
        with self._locked():
            if version is None or self._read() != version:
                return
            os.remove(self.path)
            os.remove(self.lock_path)  # waiters see it gone and lock a new one (`_locked`)
            if self.made_folder:
                try:
                    os.rmdir(self.folder)
                except OSError:  # the job wrote there
                    pass


class S3Store:
    """`s3://bucket/<prefix>/lease.json` with conditional PutObject (If-None-Match / If-Match on
    the ETag), through botocore (installed with s3fs); the endpoint as `io.storage` finds it."""

    def __init__(self, prefix_uri: str, settle_s: float = S3_SETTLE_S):
        import botocore.session

        self.bucket, prefix = s3_bucket_and_key(join(prefix_uri, LEASE_FILE))
        self.key = prefix
        self.settle_s = settle_s
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=s3_endpoint(None), region_name=region)

    @staticmethod
    def _code(error: Exception) -> str:
        response = getattr(error, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def read(self) -> tuple[bytes | None, Any]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return got["Body"].read(), got["ETag"]

    def _put(self, data: bytes, **condition: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                   ContentType="application/json", **condition)
        except ClientError as e:
            # 412: the condition failed; 409: another conditional write to the key at the same
            # time; NoSuchKey: If-Match on a lease removed meanwhile
            if self._code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
                return False
            raise
        return True

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: Any) -> bool:
        return version is not None and self._put(data, IfMatch=str(version))

    def delete(self, version: Any) -> None:
        data, now = self.read()
        if data is not None and now == version:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


def store_for(output_uri: str) -> LeaseStore:
    """The lease store of an output folder or s3:// prefix."""
    if output_uri.startswith(S3_SCHEME):
        return S3Store(output_uri)
    return LocalStore(filesystem(output_uri)[1])
