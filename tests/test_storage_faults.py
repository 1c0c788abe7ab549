"""Flaky storage: transient failures are retried with backoff (S3 through a real misbehaving HTTP
proxy in front of moto; local/network mounts by injected errno), and a permanent failure becomes
an error row, not a crash."""
from __future__ import annotations

import errno
import http.client
import os
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from psa_ray.io import storage
from psa_ray.io.images import encode_png
from psa_ray.io.storage import RetryPolicy, exists, join, list_files, read_bytes, write_bytes
from psa_ray.pipeline.readers import decode_rows

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "expect"}


@dataclass
class Fault:
    """Answer requests whose method is in `methods` and whose path contains `path` with an S3
    error (`status`, `code`), or drop the connection (status 0); `times` requests (None: all)."""

    methods: tuple[str, ...]
    path: str = ""
    status: int = 503
    code: str = "SlowDown"
    times: int | None = 1


class FlakyS3Proxy:
    """An HTTP proxy on 127.0.0.1 that forwards to an S3 server, except where a Fault applies."""

    def __init__(self, upstream: str):
        url = urlsplit(upstream)
        self.upstream = (url.hostname, url.port)
        self.faults: list[Fault] = []
        self.served: list[tuple[str, str, int]] = []  # (method, path, status); 0 = dropped
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if method in fault.methods and fault.path in path and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def injected(self) -> int:
        return sum(1 for _, _, status in self.served if status == 0 or status >= 400)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK expects

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return body

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                proxy.served.append((self.command, self.path, status))
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._fault(self.command, self.path)
                if fault is not None and fault.status == 0:
                    proxy.served.append((self.command, self.path, 0))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault is not None:
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                           "<Message>injected by the test proxy</Message></Error>").encode()
                    self._reply(fault.status, [("Content-Type", "application/xml"),
                                               ("Content-Length", str(len(xml)))], xml)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                if self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                keep = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS
                        and (k.lower() != "content-length" or self.command == "HEAD")]
                if self.command != "HEAD":
                    keep.append(("Content-Length", str(len(data))))
                self._reply(response.status, keep, data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3_server):
    flaky = FlakyS3Proxy(s3_server)
    yield flaky
    flaky.close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff sleeps of our retry layer (recorded, not slept); 5 attempts."""
    recorded: list[float] = []
    monkeypatch.setattr(storage, "RETRY_POLICY", RetryPolicy(attempts=5, base_delay=0.01, sleep=recorded.append))
    return recorded


# --------------------------------------------------------------------------- S3 through the proxy

# The AWS SDK itself makes up to 3 attempts per request for the errors it knows (503 SlowDown,
# 500, dropped connections), none for others (429): 4 faults in a row need our own retries too.
@pytest.mark.parametrize("fault", [Fault(("GET",), status=503, code="SlowDown", times=4),
                                   Fault(("GET",), status=429, code="TooManyRequests", times=4),
                                   Fault(("GET",), status=0, times=4)],
                         ids=["503-slow-down", "429-too-many-requests", "dropped-connection"])
def test_reads_survive_throttling_and_dropped_connections(s3_bucket, proxy, sleeps, fault):
    payload = os.urandom(20_000)  # image-sized: bigger than an S3 error document
    write_bytes(join(s3_bucket, "img.jpg"), payload)
    proxy.faults.append(fault)
    assert read_bytes(join(s3_bucket, "img.jpg"), endpoint_url=proxy.url) == payload
    assert fault.times == 0 and proxy.injected() == 4, "every fault was hit, then the read went through"
    assert sleeps, "our backoff stepped in where the SDK's attempts ran out"
    assert all(later >= earlier / 2 for earlier, later in zip(sleeps, sleeps[1:], strict=False)), "delays grow"


def test_writes_listings_and_existence_checks_are_retried(s3_bucket, s3_server, proxy, sleeps):
    proxy.faults += [Fault(("PUT",), status=500, code="InternalError", times=3),
                     Fault(("HEAD",), status=503, code="SlowDown", times=3),
                     Fault(("GET",), path="list-type", status=503, code="ServiceUnavailable", times=3)]
    write_bytes(join(s3_bucket, "labels", "a.png"), b"label", endpoint_url=proxy.url)
    assert read_bytes(join(s3_bucket, "labels", "a.png"), endpoint_url=s3_server) == b"label"
    assert exists(join(s3_bucket, "labels", "a.png"), endpoint_url=proxy.url)
    assert list_files(join(s3_bucket, "labels"), endpoint_url=proxy.url) == [join(s3_bucket, "labels", "a.png")]
    assert [f.times for f in proxy.faults] == [0, 0, 0] and proxy.injected() == 9
    puts = [status for method, _, status in proxy.served if method == "PUT"]
    assert puts == [500] * 3 + [200], "one successful upload: no duplicate or partial objects"
    assert sleeps, "our backoff stepped in where the SDK's attempts ran out"


def test_storage_outage_and_denied_access_become_error_rows(s3_bucket, proxy, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(storage, "RETRY_POLICY", RetryPolicy(attempts=2, base_delay=0.01, sleep=sleeps.append))
    png = encode_png(np.asarray(Image.new("RGB", (48, 40), (10, 200, 30))))
    for name in ("outage.png", "denied.png", "good.png"):
        write_bytes(join(s3_bucket, name), png)
    proxy.faults += [Fault(("GET", "HEAD"), path="outage.png", status=503, code="ServiceUnavailable", times=None),
                     Fault(("GET", "HEAD"), path="denied.png", status=403, code="AccessDenied", times=None)]
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # decode_rows reaches S3 the way workers do
    uris = [join(s3_bucket, n) for n in ("outage.png", "denied.png", "gone.png", "good.png")]
    out = decode_rows({"image_id": np.array(["a", "b", "c", "d"], object), "image": np.array(uris, object)})
    assert list(out["error"]) == ["unavailable", "read", "missing", ""]
    assert list(out["stage"]) == ["read", "read", "read", ""]
    assert "HTTP status 503" in out["message"][0] and "after retries" in out["message"][0]
    assert "ACCESS_DENIED" in out["message"][1]
    assert np.array_equal(out["rgb"][3][0, 0], [10, 200, 30])
    assert len(sleeps) == 1, "the outage was retried (once, under this policy); denied access was not"


# --------------------------------------------------------------------------- local / network mounts


class _FaultyLocalFilesystem:
    """pyarrow's LocalFileSystem, with OSErrors raised by the named methods until their lists run out."""

    def __init__(self, faults: dict[str, list[OSError]]):
        import pyarrow.fs as pafs

        self.inner, self.faults, self.calls = pafs.LocalFileSystem(), faults, []

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            if self.faults.get(name):
                raise self.faults[name].pop(0)
            return method(*args, **kwargs)

        return call


@pytest.fixture
def faulty_local(monkeypatch):
    """install(faults) -> the _FaultyLocalFilesystem that storage now uses for local paths."""
    real = storage.filesystem

    def install(faults: dict[str, list[OSError]]) -> _FaultyLocalFilesystem:
        fs = _FaultyLocalFilesystem(faults)
        monkeypatch.setattr(storage, "filesystem", lambda uri, endpoint_url=None: (fs, real(uri)[1]))
        return fs

    return install


def test_network_mount_errors_are_retried_on_local_paths(tmp_path, sleeps, faulty_local):
    fs = faulty_local({"open_output_stream": [OSError(errno.EIO, "Input/output error")] * 2,
                       "move": [OSError(errno.ESTALE, "Stale file handle")],
                       "open_input_stream": [OSError(errno.ETIMEDOUT, "Connection timed out")]})
    target = str(tmp_path / "labels" / "a.png")
    write_bytes(target, b"label")
    assert read_bytes(target) == b"label"
    assert fs.calls.count("open_output_stream") == 4 and fs.calls.count("open_input_stream") == 2
    assert len(sleeps) == 4
    assert os.listdir(tmp_path / "labels") == ["a.png"], "failed attempts leave no temp files"


def test_permanent_local_errors_surface_at_once_or_after_the_attempts(tmp_path, sleeps, faulty_local):
    target = str(tmp_path / "a.png")
    fs = faulty_local({"open_output_stream": [PermissionError(errno.EACCES, "Permission denied")]})
    with pytest.raises(PermissionError):
        write_bytes(target, b"label")
    assert fs.calls.count("open_output_stream") == 1 and sleeps == []
    fs = faulty_local({"open_output_stream": [OSError(errno.EIO, "Input/output error")] * 10})
    with pytest.raises(OSError, match="Input/output"):
        write_bytes(target, b"label")
    assert fs.calls.count("open_output_stream") == 5 and len(sleeps) == 4
    assert os.listdir(tmp_path) == []
