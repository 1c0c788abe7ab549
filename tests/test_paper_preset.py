"""The paper preset end to end on psa's backbone (issue 14): ResNet-38 from a state dict in psa's
key layout, DeepLab-LargeFOV on its labels, on a few small images with 1 epoch, tiny crops and one
CAM scale, on CPU (ResNet-50 from torchvision's layout: `test_models.py`, `test_recipe.py`).
Checks that every stage ran, every row is accounted for, and that psa's recipe held on the way:
frozen BatchNorm and stem, seed-score files, psa's settings in run.json."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from psa_ray.data.synthetic import SyntheticConfig, write_corpus
from psa_ray.io.seeds import decode_seed
from psa_ray.io.storage import join, list_files, read_bytes
from psa_ray.models.backbones import build_backbone
from psa_ray.pipeline.labeling import LabelJob, run
from psa_ray.pipeline.writers import EVAL_VARIANTS, read_tables

NUM_IMAGES = 4


def _pretrained_state(backbone: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A "pretrained" backbone state dict in the reference's key layout (psa's names for
    resnet38d, torchvision's whole resnet50 with its `fc`), with non-trivial BN statistics; and
    the modules psa's recipe keeps as loaded: every BatchNorm and the stem."""
    if backbone == "resnet38d":
        model: nn.Module = build_backbone("resnet38d")   # its names are psa's (conv1a, b2_1, bn7, ...)
    else:
        from torchvision.models import resnet50
        model = resnet50(weights=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    return model.state_dict(), norms | set(build_backbone(backbone).stem_modules)


def _frozen(key: str, frozen_modules: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in frozen_modules for i in range(1, len(parts)))


@pytest.mark.slow
def test_paper_preset_runs_end_to_end_from_pretrained_weights(ray_cluster, tmp_path):
    backbone = "resnet38d"
    manifest = write_corpus(str(tmp_path / "corpus"),
                            SyntheticConfig(num_images=NUM_IMAGES, seed=7, min_size=40, max_size=48))
    state, frozen_modules = _pretrained_state(backbone)
    stem = build_backbone(backbone).stem_modules
    weights = str(tmp_path / f"{backbone}_imagenet.pth")
    torch.save(state, weights)
    # The paper preset's own resources: on the test's 2-CPU Ray the CPU-only pool leaves its reads
    # and writes room (`stages.cpu_only_pipeline`).
    output = str(tmp_path / "out")
    summary = run(LabelJob(output=output, input=manifest, gt=str(tmp_path / "corpus" / "gt"), preset="paper",
                           backbone=backbone, backbone_weights=weights, epochs=1, crop_size=32,
                           scales=(1.0,), train_workers=1, train_segmentation=True))

    # every stage ran and every row is accounted for
    stages = {"train_cam", "seeds", "train_affinity", "labels"}
    assert set(summary["timings_s"]) >= stages | {"train_deeplab"}
    assert summary["counts"]["labeled"] == NUM_IMAGES and summary["counts"]["errors"] == 0
    ids = {u.rsplit("/", 1)[-1][:-4] for u in list_files(str(tmp_path / "corpus" / "images"), ".png")}
    assert sorted(read_tables(join(output, "shards")).column("image_id").to_pylist()) == sorted(ids)
    assert {u.rsplit("/", 1)[-1][:-4] for u in list_files(join(output, "labels"), ".png")} == ids
    metrics = json.loads(read_bytes(join(output, "metrics.json")))
    assert metrics["images"] == NUM_IMAGES and all(0 <= metrics[v]["miou"] <= 1 for v in EVAL_VARIANTS)

    # stage B kept psa's CRF scores (bg + the tags, low and high alpha) at the image size
    for image_id in ids:
        seed = decode_seed(read_bytes(join(output, "seeds", f"{image_id}.png")))
        image = Image.open(os.path.join(tmp_path, "corpus", "images", f"{image_id}.png"))
        assert seed.ndim == 4 and seed.shape[0] == 2 and seed.shape[2:] == (image.height, image.width)
        assert seed.shape[1] >= 2 and (seed.astype(int).sum(1) > 200).all()

    # psa's settings reached the run (and the workers: meta.json holds the config they trained with)
    preset = json.loads(read_bytes(join(output, "run.json")))["preset"]
    assert preset["cam_train"]["resize_long"] == [256, 512] and preset["cam_train"]["batch_size"] == 16
    assert preset["affinity_train"]["resize_long"] is None and preset["cam"]["seed_scores"]
    assert preset["cam"]["resample"] == "pil_bicubic"
    assert preset["deeplab_train"]["segmentation_head"] == "largefov"

    # BatchNorm and the stem were frozen in both networks; the rest of the backbone moved
    cam = torch.load(join(output, "checkpoints", "cam", "model.pt"), weights_only=True)
    affinity = torch.load(join(output, "checkpoints", "affinity", "model.pt"), weights_only=True)
    loaded = {k: v for k, v in state.items() if f"backbone.{k}" in cam}
    assert len(loaded) > 0.9 * len(cam)
    frozen = [k for k in loaded if _frozen(k, frozen_modules) and not k.endswith("num_batches_tracked")]
    trained = [k for k in loaded if not _frozen(k, frozen_modules) and k.endswith("weight")]
    assert any(k.endswith("running_var") for k in frozen) and any(k.split(".")[0] == stem[0] for k in frozen)
    for k in frozen:
        assert torch.equal(cam[f"backbone.{k}"], loaded[k]), f"CAM net changed frozen {k}"
        assert torch.equal(affinity[f"backbone.{k}"], loaded[k]), f"AffinityNet changed frozen {k}"
    assert np.mean([not torch.equal(cam[f"backbone.{k}"], loaded[k]) for k in trained]) > 0.9
    assert np.mean([not torch.equal(affinity[f"backbone.{k}"], cam[f"backbone.{k}"]) for k in trained]) > 0.9
    # stage E: DeepLab-LargeFOV on the labels, started from the CAM net
    deeplab = torch.load(join(output, "checkpoints", "deeplab", "model.pt"), weights_only=True)
    assert deeplab["fc6.weight"].shape[:2] == (1024, 4096) and "fc8.bias" in deeplab
    assert all(torch.equal(deeplab[f"backbone.{k}"], loaded[k]) for k in frozen)
