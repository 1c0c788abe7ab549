"""The cluster path of the main job: `ray job submit` to a real Ray head started with `ray start`.

The head gets its own --temp-dir, free ports and a marker in its environment. It is torn down by
killing exactly its processes (those carrying the marker or the temp dir, and their children):
`ray stop` would kill every Ray process on the machine, including a `ray.init()` cluster of the
same test session or of other users.
"""
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
from typing import Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's CLI, from ray[default]
MARKER = "PSA_RAY_TEST_HEAD"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _proc(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _head_processes(temp_dir: str) -> set[int]:
    """Live processes of the head: those with the marker in their environment or the temp dir on
    their command line, and all their descendants (Ray renames some processes, which also
    overwrites what /proc shows of their environment)."""
    tag, parents, roots = f"{MARKER}={temp_dir}".encode(), {}, set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = _proc(pid, "stat").rsplit(b")", 1)[1].split()
            if stat[0] == b"Z":
                continue
            parents[int(pid)] = int(stat[1])
            if tag in _proc(pid, "environ").split(b"\0") or temp_dir.encode() in _proc(pid, "cmdline"):
                roots.add(int(pid))
        except OSError:  # gone, or another user's process
            continue
    found, grown = set(roots), True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grown = bool(children)
    return found - {os.getpid()}


def _kill_head(temp_dir: str) -> None:
    for _ in range(20):
        pids = _head_processes(temp_dir)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)
    raise RuntimeError(f"processes of the test head survived: {sorted(_head_processes(temp_dir))}")


@pytest.fixture
def ray_head(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    """A local Ray head with a dashboard (job server) on 127.0.0.1; yields its address and the
    environment for clients (token auth off, a private HOME so no ~/.ray/auth_token is used)."""
    temp_dir = tempfile.mkdtemp(prefix="psa_rayhead_", dir="/tmp")  # short: Ray's socket paths < 108 chars
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", HOME=str(home), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    start = [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host", "127.0.0.1",
             f"--dashboard-port={dashboard}", "--num-cpus", "2", "--include-dashboard", "true",
             "--disable-usage-stats", "--temp-dir", temp_dir, f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        started = subprocess.run(start, env={**env, MARKER: temp_dir}, cwd=temp_dir,
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the job server did not answer within 60 s"
            time.sleep(0.5)
        yield address, env
    finally:
        _kill_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_label_job_through_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", REPO, "--",
              sys.executable, "jobs/label_dataset.py", "--output", str(out),
              "--synthetic-images", "8", "--epochs", "1", "--train-workers", "1"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    labels = sorted(os.listdir(out / "labels"))
    assert len(labels) == 8 and all(name.endswith(".png") for name in labels)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["labeled"] == 8
