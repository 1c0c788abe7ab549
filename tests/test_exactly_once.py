"""Exactly once from the files alone: two jobs started together on one output (the output's
lease, `psa_ray.io.lease`), and the whole job SIGKILLed at random moments, then rerun.

After either, every manifest row is once in labels/+shards/ or errors/, no image_id is twice in
shards/, and every shard row has its label PNG, which decodes.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray_nodes import NODE_MARKER, RayNode
from test_faults import REPO, VALID_LABELS, _tail

from psa_ray.io.lease import LEASE_FILE
from psa_ray.io.palette import decode_label_png
from psa_ray.pipeline.writers import read_tables

# The built-in corpus, small and quick: every stage runs (corpus, CAM training, held-out AP,
# seeds, AffinityNet training, labels, report); shards and seed indexes of 8 rows, so that a kill
# can land between commits.
QUICK = ("--synthetic-images", "24", "--epochs", "1", "--crop-size", "64", "--scales", "1.0", "--shard-rows", "8",
         "--train-workers", "1")


def _label_job(output: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, "jobs", "label_dataset.py"), "--output", output, *QUICK]


def assert_exactly_once(output: str) -> dict[str, int]:
    """The invariants, read from the output's files: every manifest row once in shards/ (with its
    label PNG, which decodes to the shard's size and valid values) or errors/, never in both, no
    id twice in shards/. Returns the counts."""
    manifest = os.path.join(output, "corpus", "manifest.parquet")
    ids = pq.read_table(manifest, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    shards = read_tables(os.path.join(output, "shards"), columns=["image_id", "height", "width", "label_png"])
    errors = read_tables(os.path.join(output, "errors"), columns=["image_id", "stage"])
    shard_ids = [] if shards is None else shards.column("image_id").to_pylist()
    error_ids = [] if errors is None else errors.column("image_id").to_pylist()
    twice = sorted({i for i in shard_ids if shard_ids.count(i) > 1})
    assert not twice, f"{len(twice)} image_ids twice in shards/: {twice[:5]}"
    assert len(error_ids) == len(set(error_ids)), "an id twice in errors/"
    assert not set(shard_ids) & set(error_ids), "an id both labeled and an error"
    assert set(shard_ids) | set(error_ids) == set(ids), (
        f"missing {sorted(set(ids) - set(shard_ids) - set(error_ids))[:5]}, "
        f"unknown {sorted(set(shard_ids) | set(error_ids) - set(ids))[:5]}")
    for row in ([] if shards is None else shards.to_pylist()):
        with open(os.path.join(output, "labels", f"{row['image_id']}.png"), "rb") as f:
            label = decode_label_png(f.read())
        assert label.shape == (row["height"], row["width"]), row["image_id"]
        assert set(np.unique(label).tolist()) <= VALID_LABELS
        assert np.array_equal(decode_label_png(row["label_png"]), label), "the shard's label is the PNG's"
    return {"rows": len(ids), "labeled": len(shard_ids), "errors": len(error_ids)}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_two_jobs_started_together_on_one_output_one_labels_the_other_is_refused(ray_cluster, tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    logs = [str(tmp_path / f"job{i}.err") for i in range(2)]
    procs = []
    for log in logs:  # the same command twice, started together
        with open(log, "w") as err:
            procs.append(subprocess.Popen(_label_job(out), env=env, stdout=subprocess.DEVNULL, stderr=err,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert sorted(codes) == [0, 2], [_tail(log) for log in logs]
    with open(logs[codes.index(2)]) as f:
        refused = f.read()
    with open(os.path.join(out, "run.json")) as f:
        winner = json.load(f)["run_id"]
    lines = _error_lines(refused)
    assert len(lines) == 1 and "Traceback" not in refused, refused[-3000:]
    assert f"run {winner} (label_dataset, pid " in lines[0] and f"holds its lease ({LEASE_FILE}) until" in lines[0]
    counts = assert_exactly_once(out)
    assert counts["labeled"] == counts["rows"] == 24
    assert not os.path.exists(os.path.join(out, LEASE_FILE)), "released at the end"


# The stages as the output shows them (the one after the last whose files are there), in order.
STAGES = ("start-up", "corpus", "CAM training (A)", "held-out AP or seeds (B)", "seeds (B) or AffinityNet (C)",
          "labels (D)")
_MARKS = (("labels (D)", "checkpoints/affinity/model.pt"), ("seeds (B) or AffinityNet (C)", "index/seeds"),
          ("held-out AP or seeds (B)", "checkpoints/cam/model.pt"), ("CAM training (A)", "rows/_corpus.json"),
          ("corpus", "corpus"))


def _stage_reached(output: str) -> str:
    return next((stage for stage, path in _MARKS if os.path.exists(os.path.join(output, path))), "start-up")


def _kill_whole_job(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL the job's process group (driver, its local Ray's GCS, raylet and workers) at once,
    then any of its processes that left the group (`RayNode.kill` finds them by the marker in their
    environment, and their descendants)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    RayNode("", marker).kill()


@pytest.mark.slow
def test_three_sigkills_of_the_whole_job_then_reruns_leave_every_row_once(tmp_path):
    # Each run starts its own local Ray (RAY_ADDRESS=local), and the kill takes it down with the
    # driver. The moments: random within the duration of an unkilled run of the same command.
    marker = f"exactly-once-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_ADDRESS="local", RAY_AUTH_MODE="disabled", HOME=str(tmp_path),
               RAY_DATA_DISABLE_PROGRESS_BARS="1", **{NODE_MARKER: marker})
    started = time.monotonic()
    reference = subprocess.run(_label_job(str(tmp_path / "reference")), env=env, capture_output=True,
                               text=True, timeout=600)
    duration = time.monotonic() - started
    RayNode("", marker).kill()  # nothing of it may linger into the killed runs
    assert reference.returncode == 0, reference.stderr[-3000:]

    # One kill in each of stages A, B-C and D: a run starts, and once the output shows it in the
    # stage (A: rows/ committed; B: the CAM network exported; D: AffinityNet exported), it is
    # killed after a random share of the stage's time in the reference run. A kill that lands
    # later than aimed (the resumed run was quicker) makes the next one land in its run's start-up.
    with open(os.path.join(tmp_path, "reference", "run.json")) as f:
        took = json.load(f)["timings_s"]
    targets = {"CAM training (A)": took["train_cam"],
               "held-out AP or seeds (B)": took["cam_held_out"] + took["seeds"] + took["train_affinity"],
               "labels (D)": took["labels"]}
    out, rng, killed = str(tmp_path / "out"), random.Random(27), []
    log = str(tmp_path / "killed.log")
    for target, seconds in targets.items():
        moment = rng.random() * seconds
        with open(log, "w") as log_file:
            proc = subprocess.Popen(_label_job(out), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started = time.monotonic()
        while proc.poll() is None and STAGES.index(_stage_reached(out)) < STAGES.index(target):
            assert time.monotonic() - started < 600, f"not in {target} within 600 s"
            time.sleep(0.1)
        try:
            code = proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            _kill_whole_job(proc, marker)
            killed.append((target, round(moment, 1), round(time.monotonic() - started, 1), _stage_reached(out)))
        else:  # the run ended first
            RayNode("", marker).kill()
            assert code == 0, _tail(log)
            killed.append((target, round(moment, 1), "finished"))
    print(f"reference run {duration:.0f} s {took}; kills (stage aimed at, s into it, s into the run, the "
          f"stage on disk): {killed}")

    for _attempt in range(3):  # rerun until done
        rerun = subprocess.run(_label_job(out), env=env, capture_output=True, text=True, timeout=600)
        if rerun.returncode == 0:
            break
    RayNode("", marker).kill()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    counts = assert_exactly_once(out)
    assert counts == assert_exactly_once(str(tmp_path / "reference"))
    assert not os.path.exists(os.path.join(out, LEASE_FILE))
