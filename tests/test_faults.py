"""Faults during the main job: the driver killed in stage B, a worker node lost in stage D.

Either way every input row ends up exactly once in labels/ and shards/, and none in errors/.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from psa_ray.data.synthetic import CLASS_NAMES, SyntheticConfig, write_corpus
from psa_ray.io.palette import decode_label_png
from psa_ray.pipeline.writers import read_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 64  # 4 blocks of 16: a kill after the first written block lands mid-stage
# Node loss: 10 blocks, so that the worker node's actor (which starts seconds after the head's)
# still finds batches to take; with 4, the head's actor, 2 tasks in flight, sometimes took them all.
NODE_LOSS_IMAGES = 160
VALID_LABELS = set(range(len(CLASS_NAMES) + 1)) | {255}
# The GCS declares a killed node dead after 3 missed 1 s health checks (default: 5 x 3 s).
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def _corpus(tmp_path, seed: int, num_images: int = NUM_IMAGES) -> tuple[str, set[str]]:
    """A synthetic corpus of num_images images: its manifest and its image ids."""
    config = SyntheticConfig(num_images=num_images, seed=seed)
    manifest = write_corpus(str(tmp_path / "corpus"), config)
    return manifest, set(pq.read_table(manifest, columns=["image_id"]).column("image_id").to_pylist())


def _job(manifest: str, output: str, *options: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "jobs", "label_dataset.py"), "--input", manifest,
            "--output", output, "--preset", "demo", *options]


def _ids(folder: str) -> set[str]:
    """Image ids of the PNGs in folder (the atomic writes' temp files end in .tmp)."""
    if not os.path.isdir(folder):
        return set()
    return {name[: -len(".png")] for name in os.listdir(folder) if name.endswith(".png")}


def _wait_until(condition: Callable[[], object], proc: subprocess.Popen, what: str, log: str,
                interval_s: float, may_end: bool = False) -> bool:
    """Poll until `condition()`; False if the job ended first and `may_end`, else an assertion."""
    deadline = time.monotonic() + 300
    while not condition():
        if may_end and proc.poll() is not None:
            return False
        assert proc.poll() is None, f"the job ended before {what}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no {what} within 300 s"
        time.sleep(interval_s)
    return True


def _tail(log: str) -> str:
    with open(log, errors="replace") as f:
        return f.read()[-4000:]


def _assert_every_row_once(output: str, ids: set[str]) -> None:
    """One label PNG and one shard row per image id, nothing in errors/, a run.json that says so."""
    assert _ids(os.path.join(output, "labels")) == ids
    shards = read_tables(os.path.join(output, "shards"), columns=["image_id"])
    shard_ids = shards.column("image_id").to_pylist()
    assert len(shard_ids) == len(ids) and set(shard_ids) == ids, "every row exactly once in shards/"
    assert read_tables(os.path.join(output, "errors")) is None
    for image_id in ids:
        with open(os.path.join(output, "labels", f"{image_id}.png"), "rb") as f:
            assert set(np.unique(decode_label_png(f.read())).tolist()) <= VALID_LABELS
    with open(os.path.join(output, "run.json")) as f:
        counts = json.load(f)["counts"]
    assert counts["input_rows"] == counts["labeled"] == len(ids) and counts["errors"] == 0


@pytest.mark.slow
def test_driver_killed_in_stage_b_resumes_with_every_row_once(ray_cluster, trained_checkpoints, tmp_path):
    manifest, ids = _corpus(tmp_path, seed=11)
    out = str(tmp_path / "out")
    # A given CAM network: the job starts with stage B; the rerun then trains AffinityNet (1 epoch).
    # Seeds are committed in index/seeds/ 16 at a time (--shard-rows).
    cmd = _job(manifest, out, "--cam-checkpoint", trained_checkpoints["cam"], "--epochs", "1",
               "--train-workers", "1", "--shard-rows", "16")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    seeds, log = os.path.join(out, "seeds"), str(tmp_path / "killed.log")
    index = os.path.join(out, "index", "seeds")

    def committed():
        return read_tables(index, columns=["image_id"]) if os.path.isdir(index) else None
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_until(committed, proc, "stage B committed seeds", log, interval_s=0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    at_kill = {i: os.stat(os.path.join(seeds, f"{i}.png")) for i in committed().column("image_id").to_pylist()}
    assert 0 < len(at_kill) < NUM_IMAGES, "the kill should land during stage B"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _ids(seeds) == ids, "a seed label for every image"
    for image_id in ids:
        with open(os.path.join(seeds, f"{image_id}.png"), "rb") as f:
            seed = decode_label_png(f.read())
        image = Image.open(os.path.join(tmp_path, "corpus", "images", f"{image_id}.png"))
        assert seed.shape == (image.height, image.width)
        assert set(np.unique(seed).tolist()) <= VALID_LABELS
    for image_id, stat in at_kill.items():  # the resumed stage B left committed seeds alone
        again = os.stat(os.path.join(seeds, f"{image_id}.png"))
        assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    _assert_every_row_once(out, ids)


def _batches_running(node_processes: dict[int, str]) -> list[str]:
    """Titles of the node's Ray Data actors that are executing a batch (Ray titles a worker
    "ray::<actor class>.<method>" while it runs a task: "ray::MapWorker(...).submit")."""
    return [t for t in node_processes.values()
            if t.startswith("ray::MapWorker(") and t.endswith(".submit")]


@pytest.mark.slow
def test_worker_node_lost_mid_batch_in_stage_d_job_still_labels_every_row_once(
        local_ray_cluster, trained_checkpoints, tmp_path):
    # Two 1-CPU nodes: the demo preset's 0.5-CPU actors spread over both, and the pipeline
    # still fits on the head alone once the worker is gone.
    head = local_ray_cluster.start(num_cpus=1, system_config=FAST_NODE_DEATH)
    worker = local_ray_cluster.start(num_cpus=1, head=head)
    manifest, ids = _corpus(tmp_path, seed=12, num_images=NODE_LOSS_IMAGES)
    # Ray may place both 0.5-CPU actors on the head (a busy machine changes the timing); a run in
    # which no batch ran on the worker had nothing to lose, so it is made again on a new output.
    for attempt in range(3):
        out = str(tmp_path / f"out{attempt}")
        cmd = _job(manifest, out, "--cam-checkpoint", trained_checkpoints["cam"],
                   "--affinity-checkpoint", trained_checkpoints["affinity"])
        labels, log = os.path.join(out, "labels"), str(tmp_path / f"job{attempt}.log")
        with open(log, "w") as log_file:
            proc = subprocess.Popen(cmd, env={**local_ray_cluster.env, "RAY_ADDRESS": head.address},
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                # Keyed to a worker actor being mid-batch, not to labels/: the labels are mostly
                # written after the actor pools are done (each write task takes a whole CPU).
                landed = _wait_until(lambda: _batches_running(worker.processes()), proc,
                                     "an actor on the worker node ran a batch", log, interval_s=0.5, may_end=True)
                if landed:
                    labeled_at_kill = len(_ids(labels))
                    worker.kill()
                returncode = proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if landed:
            break
    assert landed, f"no batch ran on the worker node in 3 runs:\n{_tail(log)}"
    assert labeled_at_kill < NODE_LOSS_IMAGES, "the kill should land during stage D"
    assert returncode == 0, _tail(log)
    _assert_every_row_once(out, ids)
    with open(os.path.join(out, "run.json")) as f:
        counts = json.load(f)["counts"]
    assert counts["processed"] == NODE_LOSS_IMAGES and counts["skipped"] == 0, "one run labeled everything"
