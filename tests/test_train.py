"""Ray Train: the CAM network and DeepLab on 2 gloo workers, checkpoints in S3 (moto), resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from dataclasses import replace

import numpy as np
import pytest
import torch

from psa_ray.config import PRESETS, TrainConfig
from psa_ray.data.synthetic import SyntheticConfig, write_corpus
from psa_ray.io.inputs import read_corpus
from psa_ray.io.storage import join, list_files
from psa_ray.train.augment import TrainAugment
from psa_ray.models.inference import load_trained
from psa_ray.models.networks import build_network
from psa_ray.models.weights import load_weights
from psa_ray.train.loop import epoch_shuffle, poly_lr
from psa_ray.train.tasks import get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_poly_lr_schedule():
    assert poly_lr(0.1, 0, 100, 0.9) == pytest.approx(0.1)
    assert poly_lr(0.1, 50, 100, 0.9) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert poly_lr(0.1, 100, 100, 0.9) == 0.0


def test_each_epoch_reads_the_rows_in_a_new_order_and_a_rerun_in_the_same(ray_cluster, monkeypatch):
    """psa's shuffling DataLoader: the loop's local shuffle gives every epoch its own order of the
    rows, the same one for the same (seed, epoch, rank), and no rows lost or repeated."""
    import ray.data

    # the rows reach the loop in the dataset's order (`fit` asks Ray Train for it)
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    rows = ray.data.range(60, override_num_blocks=3)

    def order(config: TrainConfig, epoch: int, rank: int = 0) -> list[int]:
        batches = rows.iterator().iter_batches(batch_size=8, batch_format="numpy",
                                               **epoch_shuffle(config, epoch, rank))
        return [int(i) for batch in batches for i in batch["id"]]

    config = TrainConfig(seed=3)
    first, second = order(config, 0), order(config, 1)
    assert sorted(first) == sorted(second) == list(range(60))
    assert first != second and first != list(range(60))
    assert order(config, 1) == second and order(config, 1, rank=1) != second
    assert order(replace(config, seed=4), 1) != second
    assert order(replace(config, shuffle_rows=0), 1) == list(range(60))


def test_augment_keeps_image_and_mask_aligned():
    """Geometric transforms move image and mask together; padding is ignore (255) in the mask."""
    config = TrainConfig(crop_size=96, resize_long=(48, 48), color_jitter=(0, 0, 0, 0))
    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[:, :15] = 255                                  # left half white
    mask = np.zeros((40, 30), np.uint8)
    mask[:, :15] = 1                                   # left half class 1
    images, masks = TrainAugment(config).batch([rgb] * 4, [mask] * 4)
    assert images.shape == (4, 3, 96, 96) and masks.shape == (4, 96, 96)
    for image, m in zip(images, masks, strict=True):
        bright = image.mean(0) > 1.0                   # normalised white
        assert (m == 255).any() and set(m.unique().tolist()) <= {0, 1, 255}
        assert torch.equal(bright[m != 255], (m == 1)[m != 255])


@pytest.fixture(scope="module")
def s3_corpus(ray_cluster, s3_bucket_module):
    """A small synthetic corpus in a moto bucket, with ground-truth masks used as targets."""
    root = join(s3_bucket_module, "corpus")
    manifest = write_corpus(root, SyntheticConfig(num_images=24, seed=3))
    corpus, errors = read_corpus(manifest)
    assert not errors
    return root, corpus


def _rows(root, corpus, with_masks: bool):
    from psa_ray.pipeline.readers import corpus_rows
    rows = corpus_rows(corpus, None)
    if with_masks:
        rows = [{**r, "mask_uri": join(root, "gt", f"{r['image_id']}.png")} for r in rows]
    return rows


def _corpus_loss(task, model, root, corpus, size: int = 96) -> float:
    """The task's loss over the whole corpus, images resized to size x size, targets the true masks."""
    from psa_ray.io.images import decode_image, resize_label
    from psa_ray.io.palette import decode_label_png
    from psa_ray.io.storage import read_bytes
    from psa_ray.models.inference import to_tensor

    images, masks = [], []
    for row in corpus.rows:
        rgb = decode_image(read_bytes(row.image))
        images.append(torch.nn.functional.interpolate(to_tensor(rgb)[None], size=(size, size),
                                                      mode="bilinear", align_corners=False)[0])
        mask = decode_label_png(read_bytes(join(root, "gt", f"{row.image_id}.png")))
        masks.append(torch.from_numpy(resize_label(mask, size, size)).long())
    tags = torch.from_numpy(np.stack([corpus.tag_vector(row) for row in corpus.rows]))
    with torch.inference_mode():
        loss, _ = task.loss(model.eval(), torch.stack(images), {"tags": tags, "mask": torch.stack(masks)})
    return float(loss)


@pytest.mark.slow
# AffinityNet trains through the same loop in every end-to-end job (tests/test_pipeline.py); here
# the image-level loss and the mask loss, on two workers.
@pytest.mark.parametrize("kind", ["cam", "deeplab"])
def test_train_two_gloo_workers_checkpoint_to_s3(kind, s3_corpus, s3_bucket_module):
    from psa_ray.pipeline.stages import train_stage
    from psa_ray.pipeline.readers import rows_dataset

    root, corpus = s3_corpus
    output = join(s3_bucket_module, f"run-{kind}")
    # The demo preset's settings for this network, on a smaller crop and for 8 epochs (with 4,
    # DeepLab's BatchNorm running statistics were still too far off in eval mode).
    config = replace(getattr(PRESETS["demo"], f"{kind}_train"), crop_size=96, resize_long=(96, 128),
                     batch_size=8, epochs=8, num_workers=2)
    preset = replace(PRESETS["demo"], **{f"{kind}_train": config})
    weights, metrics = train_stage(kind, rows_dataset(_rows(root, corpus, kind != "cam")), preset,
                                   list(corpus.class_names), output, None, cpus_per_worker=0.5)

    assert weights == join(output, "checkpoints", kind, "model.pt")
    assert metrics["epoch"] == config.epochs
    # Trained on the corpus, the network fits it better than the one it started from (worker 0's
    # seeded initialisation): its loss on every image, without augmentation, is lower.
    task = get_task(kind)
    torch.manual_seed(config.seed)
    initial = build_network(kind, config.backbone, len(corpus.class_names)).eval()
    exported = load_trained(weights)
    assert _corpus_loss(task, exported, root, corpus) < _corpus_loss(task, initial, root, corpus)
    # The exported weights and Ray Train's own last checkpoint, both in the bucket, load into
    # networks that agree with each other.
    ray_ckpts = [u for u in list_files(join(output, "checkpoints", kind), suffix="model.pt")
                 if "/checkpoint_" in u]
    assert ray_ckpts, "Ray Train wrote no checkpoint to S3"
    from_ray = load_trained(weights)
    load_weights(from_ray, sorted(ray_ckpts)[-1])
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(exported(x), from_ray(x))


@pytest.mark.slow
def test_killed_training_resumes_from_checkpoint(ray_cluster, tmp_path):
    """SIGKILL the training driver after its first checkpoint; the rerun continues the step count."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(REPO, "jobs", "train_cam.py"), "--output", out,
           "--synthetic-images", "32", "--epochs", "4", "--workers", "1", "--cpus-per-worker", "0.5",
           "--val-fraction", "0"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    # A checkpoint counts once Ray Train has recorded it in its checkpoint manager's snapshot
    # (what a restarted run restores from), not when its files appear.
    snapshot = os.path.join(out, "checkpoints", "cam", "checkpoint_manager_snapshot.json")
    while not (os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read()):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "checkpoints", "cam", "model.pt"))

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{\n"):])
    metrics = report["metrics"]
    assert metrics["resumed_from_epoch"] >= 1
    assert metrics["epoch"] == 4
    steps_per_epoch = -(-32 // 16)
    assert metrics["step"] == 4 * steps_per_epoch


@pytest.mark.slow
def test_the_same_command_gives_byte_identical_networks_and_labels(quick_job, tmp_path):
    """The quick job of conftest run again with the same options (and --seed) on the same
    machine trains the same networks and writes the same label files, byte for byte."""
    from psa_ray.pipeline.labeling import run

    job, summary = quick_job
    again = run(replace(job, output=str(tmp_path / "again")))
    first, second = ({name: open(os.path.join(o, "labels", name), "rb").read()
                      for name in os.listdir(os.path.join(o, "labels"))} for o in (job.output, again["output"]))
    assert len(first) == summary["counts"]["labeled"] and first == second
    for kind in ("cam", "affinity"):
        a, b = (torch.load(s["checkpoints"][kind], weights_only=True) for s in (summary, again))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
