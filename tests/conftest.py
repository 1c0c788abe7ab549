"""Shared fixtures."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
_S3_ENV_CLEARED = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; AWS_* variables point every client at it. Yields its URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in (*env, *_S3_ENV_CLEARED)}
    for k in _S3_ENV_CLEARED:
        os.environ.pop(k, None)
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server, as "s3://<bucket>"."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="module")
def s3_bucket_module(s3_server):
    """Like `s3_bucket`, shared by the tests of one module (e.g. a corpus written once)."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """A real local Ray cluster (2 CPUs) for the session; yields its GCS address for subprocess
    drivers (RAY_ADDRESS). The S3 server comes first so that workers inherit AWS_ENDPOINT_URL."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", *_S3_ENV)}})
    DataContext.get_current().execution_options.verbose_progress = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
