"""The main job end to end: S3 in and out, every row accounted for, resume after a kill."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from psa_ray.data.synthetic import CLASS_NAMES, SyntheticConfig, write_corpus
from psa_ray.io.palette import decode_label_png
from psa_ray.io.storage import join, list_files, read_bytes
from psa_ray.pipeline.labeling import LabelJob, run
from psa_ray.pipeline.writers import read_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = len(CLASS_NAMES)


def _check_outputs(output: str, manifest: str, expect_ids: set[str]) -> None:
    """One label PNG and one shard row per image, values in 0..C or 255, sizes equal the images."""
    labels = list_files(join(output, "labels"), suffix=".png")
    assert sorted(u.rsplit("/", 1)[-1][:-4] for u in labels) == sorted(expect_ids)
    shards = read_tables(join(output, "shards"))
    ids = shards.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expect_ids), "every image exactly once in shards/"
    assert read_tables(join(output, "errors")) is None
    base = manifest.rsplit("/", 1)[0]
    for row in shards.to_pylist():
        label = decode_label_png(read_bytes(join(output, "labels", f"{row['image_id']}.png")))
        image = Image.open(io.BytesIO(read_bytes(join(base, "images", f"{row['image_id']}.png"))))
        assert label.shape == (image.height, image.width) == (row["height"], row["width"])
        assert set(np.unique(label).tolist()) <= set(range(C + 1)) | {255}
        assert np.array_equal(decode_label_png(row["label_png"]), label)
        assert abs(sum(row["class_fractions"]) - 1.0) < 1e-4
        assert 0.0 < row["mean_confidence"] <= 1.0


@pytest.mark.slow
def test_label_job_end_to_end_on_s3(ray_cluster, s3_bucket):
    manifest = write_corpus(join(s3_bucket, "corpus"), SyntheticConfig(num_images=12, seed=5))
    output = join(s3_bucket, "out")
    summary = run(LabelJob(output=output, input=manifest, gt=join(s3_bucket, "corpus", "gt"),
                           preset="demo", epochs=1, train_workers=1))
    ids = {f.rsplit("/", 1)[-1][:-4] for f in list_files(join(s3_bucket, "corpus", "images"), ".png")}
    _check_outputs(output, manifest, ids)
    run_json = json.loads(read_bytes(join(output, "run.json")))
    assert run_json["counts"]["labeled"] == 12 and run_json["counts"]["errors"] == 0
    assert run_json["preset"]["walk"]["beta"] == 8.0 and run_json["preset"]["walk"]["t"] == 256
    metrics = json.loads(read_bytes(join(output, "metrics.json")))
    assert metrics["class_names"][0] == "background" and metrics["images"] == 12
    for variant in ("cam", "cam_crf", "rw", "rw_crf"):
        assert 0.0 <= metrics[variant]["miou"] <= 1.0
    assert summary["checkpoints"]["cam"].startswith("s3://")

    # A rerun over the same output labels nothing again and changes nothing.
    again = run(LabelJob(output=output, input=manifest, preset="demo", epochs=1, train_workers=1))
    assert again["counts"]["processed"] == 0 and again["counts"]["skipped"] == 12
    _check_outputs(output, manifest, ids)


@pytest.mark.slow
def test_job_killed_during_stage_d_resumes_without_duplicates(ray_cluster, trained_checkpoints, tmp_path):
    num_images = 64  # 4 blocks of 16: a kill after the first written block lands mid-stage
    manifest = write_corpus(str(tmp_path / "corpus"), SyntheticConfig(num_images=num_images, seed=9))
    out = str(tmp_path / "out")
    # Trained networks given: the job goes straight to stage D, where the kill lands.
    cmd = [sys.executable, os.path.join(REPO, "jobs", "label_dataset.py"), "--input", manifest,
           "--output", out, "--preset", "demo", "--cam-checkpoint", trained_checkpoints["cam"],
           "--affinity-checkpoint", trained_checkpoints["affinity"]]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    labels = os.path.join(out, "labels")
    deadline = time.time() + 300
    while not (os.path.isdir(labels) and os.listdir(labels)):
        assert proc.poll() is None, "job ended before stage D wrote a label"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(os.listdir(labels))
    assert 0 < partial < num_images, "the kill should land during stage D"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = {f"syn_{i:06d}" for i in range(num_images)}
    _check_outputs(out, manifest, ids)
    shard_files = [os.path.join(out, "shards", f) for f in os.listdir(os.path.join(out, "shards"))]
    total = sum(pq.read_metadata(f).num_rows for f in shard_files)
    assert total == num_images, "no shard row written twice"


@pytest.mark.slow
def test_gpu_and_cpu_layouts_of_stage_d_give_the_same_labels(ray_cluster, trained_checkpoints, tmp_path):
    """Stage D as GPU clusters run it (a network actor pool, then a CRF pool; GPU requests zeroed
    here) and as CPU-only clusters do (one pool of chained actors): the same label bytes."""
    from dataclasses import replace

    from psa_ray.config import PRESETS
    from psa_ray.io.manifest import read_corpus
    from psa_ray.pipeline.labeling import corpus_rows, label_stage

    corpus, _ = read_corpus(write_corpus(str(tmp_path / "corpus"), SyntheticConfig(num_images=6, seed=4)))
    preset = PRESETS["demo"]
    preset = replace(preset, pipeline=replace(preset.pipeline, gpu_actor_gpus=0.0))
    labels = {}
    for has_gpu in (True, False):
        output = str(tmp_path / f"out_gpu_{has_gpu}")
        counts = label_stage(corpus_rows(corpus, None), preset, trained_checkpoints["cam"],
                             trained_checkpoints["affinity"], len(corpus.class_names), output, "run",
                             has_gpu=has_gpu)
        assert counts == {"skipped": 0, "processed": 6}
        labels[has_gpu] = {u.rsplit("/", 1)[-1]: read_bytes(u)
                           for u in list_files(join(output, "labels"), suffix=".png")}
    assert len(labels[True]) == 6 and labels[True] == labels[False]
