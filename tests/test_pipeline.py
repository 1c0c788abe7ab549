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
        assert 0.0 <= row["quality"] <= 1.0


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


def _small_corpus(root, num_rows: int) -> str:
    """A manifest of num_rows distinct ids over 12 small (40 px) synthetic images: cheap to label."""
    from psa_ray.io.manifest_writer import write_manifest
    from psa_ray.io.rows import CorpusRow
    from psa_ray.io.inputs import read_corpus

    samples = read_corpus(write_corpus(str(root), SyntheticConfig(num_images=12, seed=9)))[0].rows
    for sample in samples:
        Image.open(sample.image).resize((40, 40), Image.Resampling.BILINEAR).save(sample.image)
    rows = [CorpusRow(f"r{i:05d}", os.path.relpath(samples[i % 12].image, root), samples[i % 12].tags)
            for i in range(num_rows)]
    manifest = str(root / "big.parquet")
    write_manifest(rows, manifest)
    return manifest


@pytest.mark.slow
def test_job_stopped_part_way_resumes_with_the_rest_without_listing_labels(
        ray_cluster, trained_checkpoints, tmp_path, monkeypatch):
    """A job killed in stage D after some shards were committed; the rerun labels only the rest,
    commits every row exactly once, and never lists labels/ or seeds/ (the done rows come from
    the committed tables)."""
    import psa_ray
    from psa_ray.pipeline.writers import table_rows

    num_rows = 1500
    manifest = _small_corpus(tmp_path / "corpus", num_rows)
    out = str(tmp_path / "out")
    job = ["--input", manifest, "--output", out, "--preset", "demo", "--shard-rows", "100",
           "--cam-checkpoint", trained_checkpoints["cam"], "--affinity-checkpoint", trained_checkpoints["affinity"]]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "label_dataset.py"), *job],
                            env={**os.environ, "RAY_ADDRESS": ray_cluster}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    shards = os.path.join(out, "shards")
    deadline = time.time() + 300
    while not (os.path.isdir(shards) and len(os.listdir(shards)) >= 2):
        assert proc.poll() is None, "job ended before stage D committed two shards"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = table_rows(shards)
    assert 0 < committed < num_rows, "the kill should land during stage D"

    listed: list[str] = []

    def listing(list_files):
        def spy(prefix, *args, **kwargs):
            listed.append(prefix)
            return list_files(prefix, *args, **kwargs)
        return spy

    for name, module in list(sys.modules.items()):
        if name.startswith(psa_ray.__name__) and hasattr(module, "list_files"):
            monkeypatch.setattr(module, "list_files", listing(module.list_files))
    summary = run(LabelJob(output=out, input=manifest, preset="demo", shard_rows=100,
                           cam_checkpoint=trained_checkpoints["cam"],
                           affinity_checkpoint=trained_checkpoints["affinity"]))
    assert summary["counts"]["skipped"] == committed
    assert summary["counts"]["processed"] == num_rows - committed
    per_image_folders = (join(out, "labels"), join(out, "seeds"))  # index/seeds/ is a table: fine
    assert listed and not [p for p in listed if p.rstrip("/").startswith(per_image_folders)], listed

    ids = read_tables(join(out, "shards"), columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == [f"r{i:05d}" for i in range(num_rows)], "every row in exactly one shard row"
    assert len(os.listdir(join(out, "labels"))) == num_rows
    assert read_tables(join(out, "errors")) is None


@pytest.mark.slow
def test_gpu_and_cpu_layouts_of_stage_d_give_the_same_labels(ray_cluster, trained_checkpoints, tmp_path):
    """Stage D as GPU clusters run it (a network actor pool, then a CRF pool; GPU requests zeroed
    here) and as CPU-only clusters do (one pool of chained actors): the same label bytes."""
    from dataclasses import replace

    from psa_ray.config import PRESETS
    from psa_ray.io.inputs import read_corpus
    from psa_ray.pipeline.readers import corpus_rows
    from psa_ray.pipeline.stages import label_stage
    from psa_ray.pipeline.readers import rows_dataset
    from psa_ray.pipeline.writers import table_rows

    corpus, _ = read_corpus(write_corpus(str(tmp_path / "corpus"), SyntheticConfig(num_images=6, seed=4)))
    preset = PRESETS["demo"]
    preset = replace(preset, pipeline=replace(preset.pipeline, gpu_actor_gpus=0.0))
    labels = {}
    for has_gpu in (True, False):
        output = str(tmp_path / f"out_gpu_{has_gpu}")
        label_stage(rows_dataset(corpus_rows(corpus, None)), preset, trained_checkpoints["cam"],
                    trained_checkpoints["affinity"], len(corpus.class_names), output, "run",
                    has_gpu=has_gpu, evaluate=False)
        assert table_rows(join(output, "shards")) == 6
        labels[has_gpu] = {u.rsplit("/", 1)[-1]: read_bytes(u)
                           for u in list_files(join(output, "labels"), suffix=".png")}
    assert len(labels[True]) == 6 and labels[True] == labels[False]
