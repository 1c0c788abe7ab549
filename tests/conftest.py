"""Shared fixtures: the S3 server and buckets, the session's Ray cluster, Ray clusters of
separate nodes (`ray_nodes.LocalRayCluster`), exported networks and trained checkpoints."""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from ray_nodes import LocalRayCluster

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


def _new_bucket(s3_server: str) -> str:
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server, as "s3://<bucket>"."""
    return _new_bucket(s3_server)


@pytest.fixture(scope="module")
def s3_bucket_module(s3_server):
    """Like `s3_bucket`, shared by the tests of one module (e.g. a corpus written once)."""
    return _new_bucket(s3_server)


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


@pytest.fixture
def local_ray_cluster(tmp_path) -> Iterator[LocalRayCluster]:
    """An empty `LocalRayCluster`; every node it started is killed at teardown."""
    home = tmp_path / "ray_home"
    home.mkdir()
    cluster = LocalRayCluster(str(home))
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _save_network(folder: str, kind: str, net: Any) -> str:
    """A tiny-backbone network on the synthetic classes, exported as `fit` exports one (the
    demo preset's training config); returns the weights path."""
    from dataclasses import replace

    from psa_ray.config import PRESETS
    from psa_ray.data.synthetic import CLASS_NAMES
    from psa_ray.io.storage import join
    from psa_ray.models.inference import export_network, network_meta

    demo = PRESETS["demo"]
    meta = network_meta(kind, replace(demo.train_config(kind), backbone="tiny"), list(CLASS_NAMES), demo.walk.radius)
    return export_network(net.state_dict(), meta, join(folder, "checkpoints", kind))


@pytest.fixture
def save_network():
    """save_network(folder, kind, net) -> weights path: `net` exported as `fit` exports it."""
    return _save_network


@pytest.fixture(scope="session")
def quick_job(ray_cluster, tmp_path_factory) -> tuple[Any, dict[str, Any]]:
    """(LabelJob, its summary): one quick job (1 epoch, 1 Ray Train worker) on a synthetic corpus
    of 40 images with ground truth (classes CLASS_NAMES; three blocks of rows), whose networks the
    jobs under test use. One epoch leaves some classes learned poorly (tests/test_quality.py).

    The corpus also has a truncated and a missing image: training drops them and the job labels
    the rest (the one run that trains on bad rows, for tests/test_bad_inputs.py)."""
    from psa_ray.data.synthetic import SyntheticConfig, write_corpus
    from psa_ray.io.inputs import read_corpus
    from psa_ray.io.manifest_writer import write_manifest
    from psa_ray.io.rows import CorpusRow
    from psa_ray.pipeline.labeling import LabelJob, run

    corpus = tmp_path_factory.mktemp("trained") / "corpus"
    rows = read_corpus(write_corpus(str(corpus), SyntheticConfig(num_images=40, seed=1)))[0].rows
    png = (corpus / "images" / "syn_000000.png").read_bytes()
    (corpus / "images" / "truncated.png").write_bytes(png[: len(png) // 3])
    rows += [CorpusRow("truncated", "images/truncated.png", rows[0].tags),
             CorpusRow("missing", "images/missing.png", rows[0].tags)]
    write_manifest(rows, str(corpus / "with_bad_rows.jsonl"))
    job = LabelJob(output=str(corpus.parent / "out"), input=str(corpus / "with_bad_rows.jsonl"),
                   gt=str(corpus / "gt"), preset="demo", epochs=1, train_workers=1)
    summary = run(job)
    assert summary["counts"]["labeled"] == 40 and summary["counts"]["errors"] == 2
    return job, summary


@pytest.fixture(scope="session")
def trained_checkpoints(quick_job) -> dict[str, str]:
    """{"cam": URI, "affinity": URI}: the networks of `quick_job`, so that the jobs under test skip
    training."""
    return {kind: quick_job[1]["checkpoints"][kind] for kind in ("cam", "affinity")}
