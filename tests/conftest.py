"""Shared fixtures."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

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


RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's `ray` command
NODE_MARKER = "PSA_RAY_TEST_NODE"


def free_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _proc_file(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def node_processes(temp_dir: str) -> dict[int, str]:
    """{pid: title} of the live processes of the `ray start` node with this temp dir: those with
    the node's marker in their environment or its temp dir on their command line, and all their
    descendants (Ray renames its workers, e.g. "ray::MapWorker(...)", which also overwrites what
    /proc shows of their environment)."""
    tag, parents, titles, roots = f"{NODE_MARKER}={temp_dir}".encode(), {}, {}, set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = _proc_file(pid, "stat").rsplit(b")", 1)[1].split()
            if stat[0] == b"Z":
                continue
            cmdline = _proc_file(pid, "cmdline")
            parents[int(pid)] = int(stat[1])
            titles[int(pid)] = cmdline.split(b"\0")[0].decode(errors="replace")
            if tag in _proc_file(pid, "environ").split(b"\0") or temp_dir.encode() in cmdline:
                roots.add(int(pid))
        except OSError:  # gone, or another user's process
            continue
    found, grown = set(roots), True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grown = bool(children)
    return {pid: titles[pid] for pid in found - {os.getpid()}}


@dataclass
class RayNode:
    """A node started with `ray start`: the GCS address of its cluster and its own temp dir."""

    address: str
    temp_dir: str
    job_server: str | None = None  # a head's dashboard URL, where `ray job submit` goes

    def processes(self) -> dict[int, str]:
        return node_processes(self.temp_dir)

    def kill(self) -> None:
        """SIGKILL exactly this node's processes (raylet, agents, workers; a head's GCS too)."""
        for _ in range(20):
            pids = self.processes()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.25)
        raise RuntimeError(f"processes of the Ray node {self.temp_dir} survived: {self.processes()}")


class LocalRayCluster:
    """Ray nodes on this machine, each started with `ray start` and its own --temp-dir (Ray 2.60
    takes one per node), free ports and a marker in its environment, so that one node can be
    killed alone. `ray stop` is never used: it kills every Ray process on the machine."""

    def __init__(self, home: str):
        # No token auth, and a private HOME so that no ~/.ray/auth_token is read or written.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(RAY_AUTH_MODE="disabled", HOME=home, RAY_DATA_DISABLE_PROGRESS_BARS="1")
        self.nodes: list[RayNode] = []

    def use_token_auth(self, token: str) -> None:
        """Nodes started from now on require `token` (Ray token authentication), set up as KubeRay's
        `authOptions: {mode: token}` does: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in each node's
        environment. Clients then need the token too (`env` holds it)."""
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)

    def start(self, num_cpus: int, head: RayNode | None = None,
              system_config: dict[str, Any] | None = None, job_server: bool = False) -> RayNode:
        """A head (head=None; system_config overrides Ray's internal settings; job_server: with
        the dashboard and its job server on a free port, answering when this returns) or a worker
        node joining head's cluster, on 127.0.0.1 with a small object store."""
        # Short: Ray's socket paths under the temp dir must stay below 108 characters.
        temp_dir = tempfile.mkdtemp(prefix="psa_raynode_", dir="/tmp")
        gcs, agent, agent_grpc, metrics, runtime_env, client, dashboard = free_ports(7)
        cmd = [RAY_CLI, "start", f"--num-cpus={num_cpus}", "--num-gpus=0", "--temp-dir", temp_dir,
               "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--object-store-memory={256 * 2**20}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               "--min-worker-port=0", "--max-worker-port=0"]
        assert head is None or not job_server, "only a head runs the job server"
        node = RayNode(f"127.0.0.1:{gcs}" if head is None else head.address, temp_dir,
                       f"http://127.0.0.1:{dashboard}" if job_server else None)
        if head is None:
            cmd += ["--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                    f"--include-dashboard={'true' if job_server else 'false'}"]
            if job_server:
                cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
            if system_config:
                cmd += ["--system-config", json.dumps(system_config)]
        else:
            cmd += ["--address", head.address]
        self.nodes.append(node)
        started = subprocess.run(cmd, env={**self.env, NODE_MARKER: temp_dir}, cwd=temp_dir,
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        if node.job_server:
            _wait_for_job_server(node.job_server, self.env.get("RAY_AUTH_TOKEN"))
        return node

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def _wait_for_job_server(url: str, token: str | None = None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{url}/api/version",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the job server at {url} did not answer within {timeout_s} s"
        time.sleep(0.5)


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
    """Weights and meta.json of a tiny-backbone network on the synthetic classes, as `fit`
    exports them; returns the weights path."""
    import io

    import torch

    from psa_ray.data.synthetic import CLASS_NAMES
    from psa_ray.io.storage import join, write_bytes

    weights = join(folder, "checkpoints", kind, "model.pt")
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    write_bytes(weights, buffer.getvalue())
    meta = {"kind": kind, "backbone": "tiny", "num_classes": len(CLASS_NAMES), "class_names": list(CLASS_NAMES)}
    write_bytes(join(folder, "checkpoints", kind, "meta.json"), json.dumps(meta).encode())
    return weights


@pytest.fixture
def save_network():
    """save_network(folder, kind, net) -> weights path: `net` exported as `fit` exports it."""
    return _save_network


@pytest.fixture(scope="session")
def trained_checkpoints(ray_cluster, tmp_path_factory) -> dict[str, str]:
    """{"cam": URI, "affinity": URI}: the weights of one quick job (1 epoch, 1 Ray Train worker)
    on a synthetic corpus (classes CLASS_NAMES), so that the jobs under test skip training.

    The corpus also has a truncated and a missing image: training drops them and the job labels
    the rest (the one run that trains on bad rows, for tests/test_bad_inputs.py)."""
    from psa_ray.data.synthetic import SyntheticConfig, write_corpus
    from psa_ray.io.manifest import CorpusRow, read_corpus, write_manifest
    from psa_ray.pipeline.labeling import LabelJob, run

    corpus = tmp_path_factory.mktemp("trained") / "corpus"
    rows = read_corpus(write_corpus(str(corpus), SyntheticConfig(num_images=6, seed=1)))[0].rows
    png = (corpus / "images" / "syn_000000.png").read_bytes()
    (corpus / "images" / "truncated.png").write_bytes(png[: len(png) // 3])
    rows += [CorpusRow("truncated", "images/truncated.png", rows[0].tags),
             CorpusRow("missing", "images/missing.png", rows[0].tags)]
    write_manifest(rows, str(corpus / "with_bad_rows.jsonl"))
    summary = run(LabelJob(output=str(corpus.parent / "out"), input=str(corpus / "with_bad_rows.jsonl"),
                           preset="demo", epochs=1, train_workers=1))
    assert summary["counts"]["labeled"] == 6 and summary["counts"]["errors"] == 2
    return {kind: summary["checkpoints"][kind] for kind in ("cam", "affinity")}
