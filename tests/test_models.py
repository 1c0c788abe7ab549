"""Backbones, the three networks and weight loading (own, jiwoon-ahn/psa and torchvision formats)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from psa_ray.models import (
    BACKBONES, AffinityNet, CamNet, DeepLab, WeightsError, build_backbone, build_model, load_state,
    load_weights)
from psa_ray.models.backbones import BackboneError


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """One thread: on a busy 2-core machine, two intra-op threads make these small ops ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that a mis-loaded BN shows in outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Backbones and networks


@pytest.mark.parametrize("name", ["tiny", "resnet50", "tf_efficientnet_lite0"])
@pytest.mark.parametrize("height, width", [(64, 96), (61, 83)])
def test_backbone_returns_three_stride_8_features(name, height, width):
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        features = backbone(image(2, 3, height, width))
    assert backbone.name == name
    assert len(backbone.out_channels) == 3 and len(features) == 3
    for feature, channels in zip(features, backbone.out_channels, strict=True):
        assert feature.shape == (2, channels, math.ceil(height / 8), math.ceil(width / 8))


def test_registry_builds_ours_and_timms_and_rejects_what_cannot_run_at_stride_8():
    assert set(BACKBONES) == {"resnet38d", "tiny"}
    with pytest.raises(BackboneError, match="unknown backbone 'resnet5'.*resnet38d, tiny.*timm"):
        build_backbone("resnet5")
    with pytest.raises(BackboneError, match="timm cannot run 'vit_small_patch16_224' at output stride 8"):
        build_backbone("vit_small_patch16_224")
    # timm's feature_info gives the contract: two levels, the features its classifier pooled (for
    # EfficientNet the 1280-channel head conv), and the stem up to the first stride-4 level
    lite0 = build_backbone("tf_efficientnet_lite0")
    assert lite0.out_channels == (40, 112, 1280)
    assert lite0.stem_modules == ("conv_stem", "bn1", "blocks.0", "blocks.1")
    assert build_backbone("convnext_tiny").stem_modules == ("stem", "stages.0")


def test_tiny_backbone_is_small():
    assert 300_000 <= sum(p.numel() for p in build_backbone("tiny").parameters()) <= 1_000_000


@pytest.fixture(scope="module")
def resnet38d_pair():
    """Two independently initialised ResNet-38 backbones (~105 M parameters each): built once."""
    torch.manual_seed(0)
    source = randomise_batchnorm(build_backbone("resnet38d"))
    return source, build_backbone("resnet38d")


def test_resnet38d_structure_and_features(resnet38d_pair):
    backbone = resnet38d_pair[0].eval()
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    # Names and shapes of the reference network (jiwoon-ahn/psa network/resnet38d.py).
    assert shapes["conv1a.weight"] == (64, 3, 3, 3)
    assert shapes["b2.conv_branch1.weight"] == (128, 64, 1, 1)
    assert shapes["b2_2.conv_branch2b1.weight"] == (128, 128, 3, 3)
    assert shapes["b4_5.bn_branch2a.running_mean"] == (512,)
    assert shapes["b5.conv_branch2a.weight"] == (512, 512, 3, 3)
    assert shapes["b5_2.conv_branch2b1.weight"] == (1024, 512, 3, 3)
    assert shapes["b6.conv_branch2b1.weight"] == (1024, 512, 3, 3)
    assert shapes["b7.conv_branch2a.weight"] == (1024, 2048, 1, 1)
    assert shapes["b7.conv_branch2b2.weight"] == (4096, 2048, 1, 1)
    assert shapes["bn7.running_var"] == (4096,)
    assert "b2_1.conv_branch1.weight" not in shapes and "b6_1.bn_branch2a.weight" not in shapes
    assert backbone.b5_1.conv_branch2a.dilation == (2, 2)
    assert backbone.b7.conv_branch2b1.dilation == (4, 4)
    with torch.no_grad():
        features = backbone(image(1, 3, 32, 48))
    assert [tuple(f.shape) for f in features] == [(1, 512, 4, 6), (1, 1024, 4, 6), (1, 4096, 4, 6)]
    assert backbone.out_channels == (512, 1024, 4096)
    assert all((f >= 0).all() for f in features)  # all three are ReLU outputs in the reference


def test_cam_net_logits_and_cams():
    torch.manual_seed(0)
    net = randomise_batchnorm(CamNet("tiny", num_classes=5)).eval()
    x = image(2, 3, 64, 96)
    with torch.no_grad():
        logits, cams = net(x), net.cams(x)
        class_map = F.conv2d(net.backbone(x)[-1], net.classifier.weight)
    assert logits.shape == (2, 5) and cams.shape == (2, 5, 8, 12)
    assert (cams >= 0).all() and (cams > 0).any()
    torch.testing.assert_close(logits, class_map.mean(dim=(2, 3)))
    torch.testing.assert_close(cams, class_map.clamp(min=0))


def test_networks_output_shapes():
    torch.manual_seed(0)
    x = image(2, 3, 64, 96)
    with torch.no_grad():
        assert AffinityNet("tiny").eval()(x).shape == (2, 96, 8, 12)
        assert AffinityNet("tiny", feature_dims=(8, 16, 24), out_dim=40).eval()(x).shape == (2, 40, 8, 12)
        assert DeepLab("tiny", num_classes=6).eval()(x).shape == (2, 6, 8, 12)
        assert DeepLab("resnet50", num_classes=3).eval()(x[:1]).shape == (1, 3, 8, 12)
    assert AffinityNet("resnet50").out_dim == 64 + 128 + 128


NEW_LAYERS = {
    "cam": {"classifier.weight"},
    "affinity": {"reduce.0.weight", "reduce.1.weight", "reduce.2.weight", "fuse.weight"},
    "deeplab": {f"aspp.{i}.{p}" for i in range(4) for p in ("weight", "bias")},
}


@pytest.mark.parametrize("kind, head", sorted(NEW_LAYERS.items()))
def test_param_groups_split_backbone_from_new_layers(kind, head):
    net = build_model(kind, "tiny", None if kind == "affinity" else 4)
    backbone, new = net.param_groups()
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in new} == head
    assert {names[id(p)] for p in backbone} == {n for n in names.values() if n.startswith("backbone.")}
    assert len(backbone) + len(new) == len(names)


def test_build_model_kinds_and_errors():
    assert isinstance(build_model("cam", "tiny", 3), CamNet)
    assert isinstance(build_model("affinity", "tiny", None), AffinityNet)
    assert isinstance(build_model("deeplab", "tiny", 4), DeepLab)
    with pytest.raises(ValueError, match="deeplab"):
        build_model("segmenter", "tiny", 3)
    with pytest.raises(ValueError):
        build_model("cam", "tiny", None)
    with pytest.raises(ValueError):
        build_model("affinity", "tiny", 3)


def test_backbone_is_shared_by_name_across_networks():
    cam = randomise_batchnorm(CamNet("tiny", 3)).eval()
    affinity = AffinityNet("tiny").eval()
    affinity.backbone.load_state_dict(cam.backbone.state_dict())
    x = image(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(cam.backbone(x), affinity.backbone(x), strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Weight loading


def _outputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [net(x), net.cams(x)] if isinstance(net, CamNet) else [net(x)]


@pytest.mark.parametrize("kind", ["cam", "affinity", "deeplab"])
@pytest.mark.parametrize("wrap", ["raw", "model", "state_dict", "ddp"])
def test_round_trip_through_a_file(tmp_path, kind, wrap):
    num_classes = None if kind == "affinity" else 4
    torch.manual_seed(0)
    source = randomise_batchnorm(build_model(kind, "tiny", num_classes)).eval()
    state = source.state_dict()
    saved = {"raw": state, "model": {"model": state, "epoch": torch.tensor(3)},
             "state_dict": {"state_dict": state},
             "ddp": {f"module.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "model.pt"
    torch.save(saved, path)
    torch.manual_seed(1)
    target = build_model(kind, "tiny", num_classes).eval()
    x = image(2, 3, 48, 40)
    assert not torch.equal(_outputs(source, x)[0], _outputs(target, x)[0])
    report = load_weights(target, str(path))
    for a, b in zip(_outputs(source, x), _outputs(target, x), strict=True):
        assert torch.equal(a, b)
    assert sorted(report.loaded) == sorted(state) and not report.missing and not report.unexpected


def test_whole_network_checkpoint_loads_into_a_bare_backbone(tmp_path):
    """How AffinityNet and DeepLab start from the trained CAM network."""
    cam = randomise_batchnorm(CamNet("tiny", 3)).eval()
    path = tmp_path / "cam.pt"
    torch.save(cam.state_dict(), path)
    affinity = AffinityNet("tiny").eval()
    report = load_weights(affinity.backbone, str(path))
    assert report.ignored == ["classifier.weight"]
    for k, v in cam.backbone.state_dict().items():
        assert torch.equal(affinity.backbone.state_dict()[k], v)


def test_weights_load_from_s3(s3_bucket, tmp_path):
    import boto3

    cam = randomise_batchnorm(CamNet("tiny", 3)).eval()
    path = tmp_path / "cam.pt"
    torch.save(cam.state_dict(), path)
    bucket = s3_bucket[len("s3://"):]
    boto3.client("s3").put_object(Bucket=bucket, Key="ckpt/cam.pt", Body=path.read_bytes())
    target = CamNet("tiny", 3).eval()
    load_weights(target, f"{s3_bucket}/ckpt/cam.pt")
    x = image(1, 3, 32, 32)
    assert torch.equal(target(x), cam(x))


def to_psa_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys in jiwoon-ahn/psa's naming, without the BN step counters its checkpoints lack."""
    heads = {"classifier.": "fc8.", "reduce.0.": "f8_3.", "reduce.1.": "f8_4.", "reduce.2.": "f8_5.",
             "fuse.": "f9."}
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.removeprefix("backbone.")
        for ours, theirs in heads.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("key_map", ["psa_resnet38", None])
def test_psa_resnet38_checkpoints_load_by_name(resnet38d_pair, key_map):
    """res38_cls.pth-like and res38_aff.pth-like dicts give the outputs of the nets they came from."""
    source_backbone, target_backbone = resnet38d_pair
    torch.manual_seed(0)
    source_cam = CamNet(source_backbone, 20).eval()
    source_affinity = AffinityNet(source_backbone).eval()
    target_cam = CamNet(target_backbone, 20).eval()
    target_affinity = AffinityNet(target_backbone).eval()
    cls_state = to_psa_names(source_cam.state_dict())
    aff_state = to_psa_names(source_affinity.state_dict())
    assert "fc8.weight" in cls_state and "f9.weight" in aff_state and "b4_5.conv_branch2a.weight" in cls_state

    report = load_state(target_cam, cls_state, key_map=key_map)
    assert report.key_map == "psa_resnet38" and not report.ignored
    assert all(k.endswith("num_batches_tracked") for k in report.missing)
    x = image(1, 3, 32, 40)
    for a, b in zip(_outputs(source_cam, x), _outputs(target_cam, x), strict=True):
        assert torch.equal(a, b)
    load_state(target_affinity, {**aff_state, "fc8.weight": cls_state["fc8.weight"]}, key_map=key_map)
    assert torch.equal(source_affinity(x), target_affinity(x))

    report = load_state(target_backbone, cls_state, key_map=key_map)
    assert report.ignored == ["fc8.weight"]


def test_torchvision_resnet50_state_dict_loads_strict_into_timms_resnet50():
    torch.manual_seed(0)
    reference = randomise_batchnorm(torchvision.models.resnet50(weights=None)).eval()
    cam = CamNet("resnet50", 4).eval()
    report = load_state(cam.backbone, reference.state_dict(), key_map="torchvision_resnet50")
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert not report.missing and not report.unexpected
    report = load_state(cam, reference.state_dict(), strict=False)
    assert report.missing == ["classifier.weight"] and sorted(report.ignored) == ["fc.bias", "fc.weight"]
    # The same weights in torchvision's own dilated ResNet-50 give the same three features.
    dilated = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    dilated.load_state_dict(reference.state_dict())
    extractor = create_feature_extractor(dilated.eval(), ["layer2", "layer3", "layer4"])
    x = image(1, 3, 48, 64)
    with torch.no_grad():
        expected, ours = extractor(x), cam.backbone(x)
    for name, feature in zip(["layer2", "layer3", "layer4"], ours, strict=True):
        assert torch.equal(feature, expected[name])


# ---------------------------------------------------------------------------------------------
# Rejected checkpoints


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = CamNet("tiny", 3).state_dict()
    del state["classifier.weight"]
    state["head.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_weights(CamNet("tiny", 3), str(path))
    message = str(error.value)
    assert "classifier.weight" in message and "head.extra.weight" in message and str(path) in message
    report = load_weights(CamNet("tiny", 3), str(path), strict=False)
    assert report.missing == ["classifier.weight"] and report.unexpected == ["head.extra.weight"]


def test_shape_mismatch_fails_even_when_not_strict(tmp_path):
    path = tmp_path / "five_classes.pt"
    torch.save(CamNet("tiny", 5).state_dict(), path)
    with pytest.raises(WeightsError, match=r"classifier\.weight \(5, 128, 1, 1\)"):
        load_weights(CamNet("tiny", 3), str(path), strict=False)


class NotATensor:
    """A custom class: unpickling it needs more than weights_only allows."""


def test_arbitrary_pickles_are_rejected(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"model": CamNet("tiny", 3).state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(WeightsError, match="not a weights-only PyTorch checkpoint"):
        load_weights(CamNet("tiny", 3), str(path))
    path = tmp_path / "numbers.pt"
    torch.save({"step": 3, "lr": 0.1}, path)
    with pytest.raises(WeightsError, match="not named tensors"):
        load_weights(CamNet("tiny", 3), str(path))


def test_unknown_key_map_is_rejected():
    with pytest.raises(ValueError, match="psa_resnet38"):
        load_state(CamNet("tiny", 3), {}, key_map="caffe")
