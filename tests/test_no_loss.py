"""Nothing lost and nothing hung (issue 27): the CPU-only pool leaves room for its reads and
writes, ground truth never costs a label, stage-B failures are recorded, predictions outside the
classes bias no other class, ids that would hide their files are rejected, a user's mistake is one
`error:` line, training jobs never write over another run's corpus, and a stage that cannot
progress ends the job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from ray.data import DataContext

from psa_ray.config import PRESETS
from psa_ray.data import CLASS_NAMES, SyntheticConfig, write_corpus
from psa_ray.errors import UserError, run_job
from psa_ray.io.inputs import read_corpus
from psa_ray.io.rows import ERROR_SCHEMA, id_problem, plain_rows
from psa_ray.io.palette import encode_label_png
from psa_ray.io.storage import join, read_bytes, write_bytes
from psa_ray.ops.metrics import confusion_matrix, iou_per_class
from psa_ray.pipeline.actors import RefineActor
from psa_ray.pipeline.builtin import BUILTIN_RECORD, builtin_corpus
from psa_ray.pipeline.datasources import READ_CPUS
from psa_ray.pipeline.scoring import evaluation, score_folders
from psa_ray.models.networks import build_network
from psa_ray.pipeline.readers import corpus_rows, rows_dataset
from psa_ray.pipeline.stages import (
    COMMIT_CPUS, NO_PROGRESS_ENV, cpu_only_pipeline, gpu_pipeline, label_stage, train_stage)
from psa_ray.pipeline.training import TrainJob, train_network
from psa_ray.pipeline.layout import OutputLayout
from psa_ray.pipeline.writers import (
    EVAL_VARIANTS, IndexSink, drop_retried_errors, error_table, eval_table, read_tables,
    write_table)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


# --------------------------------------------------------------------------- the CPU-only pool

@pytest.mark.parametrize("preset", ["paper", "demo"])
@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 16, 64])
def test_cpu_only_pool_leaves_a_read_a_write_and_a_commit_room(preset, cpus):
    p = cpu_only_pipeline(PRESETS[preset].pipeline, cpus)
    size = p.crf_pool[0]
    assert p.crf_pool == (size, size) and 1 <= size <= min(cpus, PRESETS[preset].pipeline.crf_pool[1])
    assert p.decode_cpus == READ_CPUS  # decodes fuse with the reads
    assert 0 < p.crf_actor_cpus <= PRESETS[preset].pipeline.crf_actor_cpus
    assert 0 < p.write_cpus <= PRESETS[preset].pipeline.write_cpus
    assert size * p.crf_actor_cpus + READ_CPUS + p.write_cpus + COMMIT_CPUS <= cpus + 1e-9
    if cpus <= PRESETS[preset].pipeline.crf_pool[1]:
        assert size == cpus  # one actor per CPU


def test_cpu_only_pool_keeps_the_demo_resources_on_two_cpus_and_waits_for_cpus_when_there_are_none():
    demo = PRESETS["demo"].pipeline
    assert cpu_only_pipeline(demo, 2) == demo.__class__(**{**demo.__dict__, "crf_pool": (2, 2)})
    paper = PRESETS["paper"].pipeline
    assert cpu_only_pipeline(paper, 0) == paper  # autoscaling from zero: the preset's requests


@pytest.mark.parametrize("preset", ["paper", "demo"])
@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8])
def test_the_gpu_layout_leaves_a_read_a_decode_a_write_and_a_commit_room(preset, cpus):
    before = PRESETS[preset].pipeline
    p = gpu_pipeline(before, cpus)
    decode = 0 if p.decode_cpus == READ_CPUS else p.decode_cpus  # fused with the reads
    assert p.gpu_actor_cpus + p.crf_actor_cpus + READ_CPUS + decode + p.write_cpus + COMMIT_CPUS <= cpus + 1e-9
    assert 0 < p.gpu_actor_cpus <= before.gpu_actor_cpus and 0 < p.crf_actor_cpus <= before.crf_actor_cpus
    assert (p == before) == (cpus >= {"paper": 5, "demo": 2}[preset])  # the preset's own where they fit
    assert (p.gpu_pool, p.crf_pool, p.gpu_actor_gpus) == (before.gpu_pool, before.crf_pool, before.gpu_actor_gpus)


@pytest.mark.slow
def test_the_gpu_layout_labels_on_a_node_of_2_cpus(ray_cluster, tmp_path, save_network, monkeypatch):
    """Stage D's two pools (network actors, then CRF actors) with the paper preset's requests on
    the 2-CPU Ray, the network actors asking for no GPU: the two whole-CPU actors used to leave
    the reads no CPU, and the stage waited forever (here: until the no-progress guard)."""
    monkeypatch.setattr(DataContext.get_current(), "execution_no_progress_timeout_s", 120)
    manifest = write_corpus(str(tmp_path / "corpus"), SyntheticConfig(num_images=4, min_size=40, max_size=48))
    weights = {kind: save_network(str(tmp_path / "nets"), kind, build_network(kind, "tiny", len(CLASS_NAMES)))
               for kind in ("cam", "affinity")}
    corpus, _ = read_corpus(manifest)
    paper = PRESETS["paper"]
    preset = replace(paper, pipeline=replace(paper.pipeline, gpu_actor_gpus=0.0))
    output = str(tmp_path / "out")
    label_stage(rows_dataset(corpus_rows(corpus, None)), preset, weights["cam"], weights["affinity"],
                len(CLASS_NAMES), output, "run", has_gpu=True, evaluate=False)
    assert len(read_tables(join(output, "shards"))) + len(read_tables(join(output, "errors")) or []) == 4


# --------------------------------------------------------------------------- scoring bias

def test_a_prediction_outside_the_classes_counts_against_the_gt_class_recall_only(tmp_path):
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 0, 1, 255]], np.uint8)
    cm = confusion_matrix(pred, gt, 2)
    assert cm.tolist() == [[2, 0, 0], [0, 1, 1]]
    # class 1: TP 1, FN 1 -> 1/2; class 0 is untouched (it was 2/3 with the 255 booked as class 0)
    assert iou_per_class(cm).tolist() == [1.0, 0.5]
    labels, truth = str(tmp_path / "labels"), str(tmp_path / "gt")
    write_bytes(join(labels, "a.png"), encode_label_png(pred))
    write_bytes(join(truth, "a.png"), encode_label_png(gt))
    assert score_folders(labels, truth, num_classes=2)["iou"] == [1.0, 0.5]


# --------------------------------------------------------------------------- ids that hide files

def test_ids_beginning_with_a_dot_are_rejected():
    for image_id in (".", ".hidden", " .x"):
        problem = id_problem(image_id)
        assert problem is not None and "'.'" in problem and "hidden" in problem
    assert id_problem("a.b") is None and id_problem("x.") is None
    table = pa.table({"image_id": [".x", "x", "x."], "image": ["a.png"] * 3, "tags": [["c"]] * 3})
    assert plain_rows(table, ["c"], "/data").tolist() == [False, True, True]


# --------------------------------------------------------------------------- ground truth apart

def _refine_batch(gt_uris: list[str]) -> dict[str, np.ndarray]:
    """Stage D rows of one 8x8 image, the CAM on its right half, each with its ground truth."""
    n = len(gt_uris)
    cam = np.zeros((1, 8, 8), np.float16)
    cam[0, :, 4:] = 0.9
    walked = np.stack([np.full((1, 1), 0.1), np.full((1, 1), 0.9)]).astype(np.float32)
    return {"image_id": _objects([f"i{k}" for k in range(n)]), "image": _objects(["a.png"] * n),
            "tag_names": _objects(["c"] * n), "rgb": _objects([np.full((8, 8, 3), 128, np.uint8)] * n),
            "class_ids": _objects([np.array([1])] * n), "cams": _objects([cam] * n),
            "walked": _objects([walked] * n), "orig_height": np.full(n, 8), "orig_width": np.full(n, 8),
            "gt_uri": _objects(gt_uris), "stage": _objects([""] * n), "error": _objects([""] * n),
            "message": _objects([""] * n)}


def test_ground_truth_problems_are_notes_and_the_labels_are_kept(tmp_path):
    """A corrupt ground-truth file, one of the wrong size and a missing one: every label is made
    (no error row) and committed; each problem is a note in eval/ and a count in the metrics."""
    good = np.zeros((8, 8), np.uint8)
    good[:, 4:] = 1
    files = {"good": encode_label_png(good), "corrupt": b"\x89PNG\r\n\x1a\n not really",
             "small": encode_label_png(good[:4, :4])}
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    uris = [str(tmp_path / f"{name}.png") for name in (*files, "missing")]
    out = RefineActor(PRESETS["paper"].walk, PRESETS["paper"].cam.alpha_low, num_classes=1,
                      evaluate=True)(_refine_batch(uris))
    assert list(out["error"]) == [""] * 4 and all(len(png) for png in out["label_png"])
    assert list(out["gt_note"]) == ["", "unreadable", "wrong_size", "missing"]
    assert "4x4" in out["gt_message"][2] and "missing.png" in out["gt_message"][3]
    assert [len(cm) for cm in out["cm_rw_crf"]] == [2 * 3, 0, 0, 0]

    rows = [{k: out[k][i] for k in out} for i in range(4)]
    write_table(str(tmp_path / "run" / "eval" / "x.parquet"), eval_table(rows))
    write_table(str(tmp_path / "run" / "shards" / "x.parquet"), pa.table({"image_id": ["i0"]}))
    metrics = evaluation(str(tmp_path / "run"), ["c"])
    assert metrics is not None and metrics["images"] == 1
    assert metrics["ground_truth_notes"] == {"missing": 1, "unreadable": 1, "wrong_size": 1}
    assert set(EVAL_VARIANTS) <= set(metrics) and metrics["cam"]["miou"] == 1.0


# --------------------------------------------------------------------------- stage-B failures

def test_stage_b_failures_are_recorded_and_only_transient_ones_are_retried(tmp_path):
    """IndexSink commits the seeds of the good rows and the failed rows to index/seed-errors/
    (the label errors' schema); a rerun drops the `unavailable` rows (to redo) and keeps the rest."""
    output = str(tmp_path)
    block = pa.table({"image_id": ["ok", "bad", "gone"], "tag_names": ["c", "c", "c"],
                      "png": [b"x", b"", b""], "seed_fractions": [[0.5, 0.5, 0.0]] * 3,
                      "stage": ["", "read", "read"], "error": ["", "decode", "unavailable"],
                      "message": ["", "not an image", "storage kept failing"]})
    layout = OutputLayout(output)
    sink = IndexSink(layout.seed_index, 2048, with_seed_fractions=True, errors_uri=layout.seed_errors)
    assert sink.write([block], None) == 1
    assert read_tables(OutputLayout(output).seed_index).column("image_id").to_pylist() == ["ok"]
    errors = read_tables(OutputLayout(output).seed_errors)
    assert errors.schema == ERROR_SCHEMA
    assert sorted(errors.select(["image_id", "stage", "error"]).to_pylist(), key=str) == sorted(
        [{"image_id": "bad", "stage": "read", "error": "decode"},
         {"image_id": "gone", "stage": "read", "error": "unavailable"}], key=str)
    assert drop_retried_errors(OutputLayout(output).seed_errors) == 1
    assert read_tables(OutputLayout(output).seed_errors).column("image_id").to_pylist() == ["bad"]
    assert drop_retried_errors(OutputLayout(output).seed_errors) == 0
    write_table(join(output, "errors", "x.parquet"), error_table([{"image_id": "gone", "stage": "read",
                                                                   "error": "unavailable"}]))
    assert drop_retried_errors(join(output, "errors")) == 1 and read_tables(join(output, "errors")) is None


def test_a_failed_seed_row_keeps_its_image_uri():
    """SeedActor passes `image` on, so index/seed-errors/ names the file that failed."""
    from psa_ray.config import CamConfig
    from psa_ray.pipeline.actors import SeedActor

    batch = {"image_id": np.array(["bad"], dtype=object), "image": np.array(["s3://b/bad.jpg"], dtype=object),
             "tag_names": np.array(["c"], dtype=object), "rgb": _objects([np.zeros((1, 1, 3), np.uint8)]),
             "cams": _objects([np.zeros((1, 1, 1), np.float16)]), "class_ids": _objects([np.array([1])]),
             "stage": np.array(["read"], dtype=object), "error": np.array(["decode"], dtype=object),
             "message": np.array(["not an image"], dtype=object)}
    out = SeedActor(CamConfig(), num_classes=1)(batch)
    assert list(out["image"]) == ["s3://b/bad.jpg"] and list(out["error"]) == ["decode"]


def test_training_readers_record_their_failed_rows_once_however_many_epochs(tmp_path):
    """`keep_decoded` with a folder: the rows that decoded go on; each failed one is written to
    errors/ under a name of its own, so that every epoch's re-read rewrites the same file."""
    from psa_ray.pipeline.readers import keep_decoded

    errors = str(tmp_path / "errors")
    batch = {"image_id": np.array(["ok", "bad"], dtype=object), "image": np.array(["a.png", "b.png"], dtype=object),
             "rgb": _objects([np.zeros((2, 2, 3), np.uint8), np.zeros((1, 1, 3), np.uint8)]),
             "stage": np.array(["", "read"], dtype=object), "error": np.array(["", "decode"], dtype=object),
             "message": np.array(["", "not an image"], dtype=object)}
    for _epoch in range(3):
        kept = keep_decoded(batch, errors=errors)
        assert list(kept["image_id"]) == ["ok"] and kept["rgb"][0].shape == (2, 2, 3)
    table = read_tables(errors)
    assert table.schema == ERROR_SCHEMA
    assert table.select(["image_id", "image", "stage", "error"]).to_pylist() == [
        {"image_id": "bad", "image": "b.png", "stage": "read", "error": "decode"}]
    assert list(keep_decoded(batch)["image_id"]) == ["ok"] and len(os.listdir(errors)) == 1


# --------------------------------------------------------------------------- user errors

class _NoRows:
    """A Dataset without rows, as far as `train_stage` asks."""
    context = SimpleNamespace(execution_options=SimpleNamespace(preserve_order=False))

    def materialize(self) -> _NoRows:
        return self

    def count(self) -> int:
        return 0


def test_no_images_to_train_on_is_one_error_line_and_status_2(tmp_path, capsys):
    def main() -> int:
        train_stage("affinity", _NoRows(), PRESETS["demo"], ["c"], str(tmp_path), None, 1.0)  # type: ignore[arg-type]
        return 0
    assert run_job(main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no images to train the affinity network on: no image has a mask")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="--val-fraction"):
        train_network("cam", TrainJob(output=str(tmp_path), val_fraction=1.5))


# --------------------------------------------------------------------------- training jobs keep data

def test_the_built_in_corpus_is_never_written_over_another_one(tmp_path):
    root = str(tmp_path / "corpus")
    small = SyntheticConfig(num_images=3, min_size=40, max_size=48)
    manifest = builtin_corpus(root, "birds", small)
    images = sorted(os.listdir(tmp_path / "corpus" / "images"))
    stamp = os.path.getmtime(manifest)
    assert builtin_corpus(root, "birds", small) == manifest and os.path.getmtime(manifest) == stamp  # reused
    for other in (replace(small, seed=1), replace(small, num_images=4)):
        with pytest.raises(UserError, match="holds the built-in corpus 'birds' \\(3 images, seed 0\\)"):
            builtin_corpus(root, "birds", other)
    with pytest.raises(UserError, match="'hard'"):
        builtin_corpus(root, "hard", small)
    # the standalone train job: a size other than the labeling run's is refused before anything is written
    with pytest.raises(UserError, match="3 images, seed 0"):
        train_network("cam", TrainJob(output=str(tmp_path), synthetic_images=5))
    assert sorted(os.listdir(tmp_path / "corpus" / "images")) == images and os.path.getmtime(manifest) == stamp
    # a corpus written before the record was kept: adopted where it is the one asked for, else refused
    os.remove(tmp_path / "corpus" / BUILTIN_RECORD)
    with pytest.raises(UserError, match="not the built-in corpus 'birds' \\(3 images, seed 1\\); pass --input"):
        builtin_corpus(root, "birds", replace(small, seed=1))
    assert not os.path.exists(tmp_path / "corpus" / BUILTIN_RECORD)
    assert builtin_corpus(root, "birds", small) == manifest and os.path.getmtime(manifest) == stamp
    assert os.path.exists(tmp_path / "corpus" / BUILTIN_RECORD)


# --------------------------------------------------------------------------- the paper preset end to end

PAPER_JOB = [sys.executable, os.path.join(REPO, "jobs", "label_dataset.py"), "--preset", "paper", "--backbone",
             "tiny", "--synthetic-images", "8", "--epochs", "1", "--crop-size", "64"]


def _paper_job(output: str, env: dict[str, str]) -> None:
    """The paper preset on the built-in corpus (8 images), its own resources; every image labeled."""
    done = subprocess.run([*PAPER_JOB, "--output", output], env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = {name[:-4] for name in os.listdir(os.path.join(output, "corpus", "images"))}
    assert len(ids) == 8 and {name[:-4] for name in os.listdir(os.path.join(output, "labels"))} == ids
    assert sorted(read_tables(join(output, "shards")).column("image_id").to_pylist()) == sorted(ids)
    assert read_tables(join(output, "errors")) is None
    # the console of a non-TTY run: a line as each stage starts and ends, none of Ray Data's progress
    console = (done.stdout + done.stderr).splitlines()
    assert len(console) <= 150, "\n".join(console)
    for name in ("corpus", "train_cam", "seeds", "train_affinity", "labels"):
        assert f"[{name}] started" in console and any(line.startswith(f"[{name}] done in ") for line in console)
    assert not [line for line in console if "logging_progress" in line or "Running Dataset" in line]


@pytest.mark.slow
def test_paper_preset_labels_the_built_in_corpus_on_the_2_cpu_ray_whatever_its_ground_truth(ray_cluster, tmp_path):
    """The paper preset's whole-CPU pool used to leave its reads no CPU (stage B waited forever).
    Its ground truth spoiled three ways first: corrupt, of the wrong size, missing; every label is
    still written and committed, and metrics.json counts the three."""
    output = str(tmp_path / "out")
    root = os.path.join(output, "corpus")
    builtin_corpus(root, "birds", SyntheticConfig(num_images=8))  # the job's own corpus, to spoil first
    corrupt, small, missing = sorted(os.listdir(os.path.join(root, "gt")))[:3]
    with open(os.path.join(root, "gt", corrupt), "r+b") as f:
        f.truncate(40)
    write_bytes(os.path.join(root, "gt", small), encode_label_png(np.zeros((20, 20), np.uint8)))
    os.remove(os.path.join(root, "gt", missing))
    _paper_job(output, {**os.environ, "RAY_ADDRESS": ray_cluster})
    metrics = json.loads(read_bytes(join(output, "metrics.json")))
    assert metrics["images"] == 5
    assert metrics["ground_truth_notes"] == {"missing": 1, "unreadable": 1, "wrong_size": 1}


@pytest.mark.slow
def test_paper_preset_labels_the_built_in_corpus_on_a_4_cpu_cluster(local_ray_cluster, tmp_path):
    head = local_ray_cluster.start(num_cpus=4)
    _paper_job(str(tmp_path / "out"), {**local_ray_cluster.env, "RAY_ADDRESS": head.address})


# --------------------------------------------------------------------------- no silent hang

@pytest.mark.slow
def test_a_stage_that_cannot_progress_ends_the_job_with_one_error_line(ray_cluster, tmp_path, save_network):
    """GPU actors asked of a CPU-only cluster never start: the job ends within the no-progress
    timeout (here 15 s) with one `error:` line naming the stage and what it asks for, status 2."""
    manifest = write_corpus(str(tmp_path / "corpus"), SyntheticConfig(num_images=4, min_size=40, max_size=48))
    weights = {kind: save_network(str(tmp_path / "nets"), kind, build_network(kind, "tiny", len(CLASS_NAMES)))
               for kind in ("cam", "affinity")}
    done = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "label_dataset.py"), "--input", manifest,
                           "--output", str(tmp_path / "out"), "--preset", "demo", "--use-gpu",
                           "--cam-checkpoint", weights["cam"], "--affinity-checkpoint", weights["affinity"]],
                          env={**os.environ, "RAY_ADDRESS": ray_cluster, NO_PROGRESS_ENV: "15"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors[0].startswith("error: stage 'labels' made no progress for 15 s: it asks for 1-2 network "
                                "actor(s) of 1 GPU")
    assert "the cluster has 2 CPU" in errors[0] and "0 GPU" in errors[0] and NO_PROGRESS_ENV in errors[0]
