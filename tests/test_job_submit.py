"""The cluster path of the main job: `ray job submit` to a real Ray head started with `ray start`
(conftest's `LocalRayCluster`: its own temp dir and ports, torn down by killing exactly its
processes; `ray stop` would kill every Ray process on the machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's CLI, from ray[default]


@pytest.mark.slow
def test_label_job_through_ray_job_submit(local_ray_cluster, tmp_path):
    head = local_ray_cluster.start(num_cpus=2, job_server=True)
    out = tmp_path / "out"
    submit = [RAY, "job", "submit", "--address", head.job_server, "--working-dir", REPO, "--",
              sys.executable, "jobs/label_dataset.py", "--output", str(out),
              "--synthetic-images", "8", "--epochs", "1", "--train-workers", "1"]
    done = subprocess.run(submit, env=local_ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    labels = sorted(os.listdir(out / "labels"))
    assert len(labels) == 8 and all(name.endswith(".png") for name in labels)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["labeled"] == 8
