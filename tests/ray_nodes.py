"""Ray clusters of separate `ray start` nodes for tests (node loss, job submission): each with its
own temp dir and ports, torn down by killing exactly its own processes."""
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
from dataclasses import dataclass
from typing import Any

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
