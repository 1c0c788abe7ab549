"""The paper preset is jiwoon-ahn/psa's recipe (issue 14): each row of the README's "Fidelity to the
reference" table that the code can get wrong has a test here that fails if it regresses."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from psa_ray.config import PRESETS, CamConfig, TrainConfig
from psa_ray.io.palette import decode_label_png, encode_label_png
from psa_ray.io.seeds import CLASSES_KEY, decode_seed, encode_seed_scores, quantize_scores
from psa_ray.models.inference import load_trained, to_tensor
from psa_ray.models.networks import DeepLab, DeepLabLargeFOV, build_model, build_network
from psa_ray.ops.affinity import cell_seed_labels
from psa_ray.ops.cam import resize_images, with_constant_background
from psa_ray.ops.pseudo_labels import seed_crf_scores, tagged_cams
from psa_ray.pipeline.actors import RefineActor, SeedActor
from psa_ray.pipeline.readers import decode_rows
from psa_ray.pipeline.writers import EVAL_VARIANTS
from psa_ray.train.augment import TrainAugment
from psa_ray.train.loop import make_optimizer
from psa_ray.train.tasks import Init, freezes_pretrained

PAPER, DEMO = PRESETS["paper"], PRESETS["demo"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- row 1: frozen BatchNorm and stem on a pretrained backbone ------------------------------------

def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))
    return model


def _is_frozen(name: str, stem: tuple[str, ...], batch_norm_names: set[str]) -> bool:
    module = name.rsplit(".", 1)[0]
    return module in batch_norm_names or any(name.startswith(f"backbone.{s}.") for s in stem)


def _one_step(model: nn.Module, config: TrainConfig) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the state dict before one SGD step of the loop's optimiser."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, config)
    model.train()
    images = torch.randn(2, 3, 32, 32)
    loss = F.multilabel_soft_margin_loss(model(images), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("backbone", ["tiny", "resnet50", "tf_efficientnet_lite0"])
def test_a_step_on_a_pretrained_backbone_keeps_batchnorm_and_stem(backbone):
    model = _randomise_batchnorm(build_model("cam", backbone, 3))
    model.freeze_pretrained()
    before = _one_step(model, PAPER.cam_train)
    after = model.state_dict()
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    stem = model.backbone.stem_modules
    frozen = [k for k in before if _is_frozen(k, stem, norms)]
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("running_mean") for k in frozen) and any(k.startswith(f"backbone.{stem[0]}.")
                                                                   for k in frozen)
    assert not set(moved) & set(frozen), "BN statistics, gamma/beta and the stem stay as loaded"
    trainable = [k for k in before if not _is_frozen(k, stem, norms)]
    assert set(moved) == set(trainable), "every other weight (backbone and classifier) moved"
    assert all(not m.training for n, m in model.named_modules() if n in norms)


def test_from_scratch_everything_trains():
    model = build_model("cam", "tiny", 3)
    before = _one_step(model, DEMO.cam_train)
    after = model.state_dict()
    assert not torch.equal(before["backbone.stem.1.running_mean"], after["backbone.stem.1.running_mean"])
    assert not torch.equal(before["backbone.stem.0.weight"], after["backbone.stem.0.weight"])


def test_frozen_layers_are_psas_on_resnet38d_and_apply_only_to_pretrained_starts():
    model = build_model("affinity", "resnet38d", None)
    model.freeze_pretrained()
    frozen_modules = {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if not p.requires_grad}
    convs = {m for m in frozen_modules if "bn" not in m}
    assert convs == {"backbone.conv1a", *(f"backbone.{b}.{c}" for b in ("b2", "b2_1", "b2_2")
                                         for c in ("conv_branch2a", "conv_branch2b1")),
                     "backbone.b2.conv_branch1"}
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms <= frozen_modules
    backbone, new = model.param_groups()
    assert all(p.requires_grad for p in backbone + new) and len(new) == 4
    # the paper preset freezes when weights are given or another network's backbone is the start
    assert freezes_pretrained(replace(PAPER.cam_train, backbone_weights="w.pth"), None)
    assert freezes_pretrained(PAPER.affinity_train, Init("cam/model.pt"))
    assert not freezes_pretrained(PAPER.cam_train, None)
    assert not freezes_pretrained(DEMO.affinity_train, Init("cam/model.pt"))


# ---- row 2: AffinityNet labels from cell-averaged CRF scores --------------------------------------

def _cell(maps: np.ndarray, cy: int, cx: int, majority: int, minority: int) -> None:
    """In the 8x8 cell (cy, cx) of maps [C,H,W]: 44 pixels all-in on `majority`, 20 (the top-left
    pixel first, as nearest sampling would read it) all-in on `minority`."""
    block = np.full(64, majority)
    block[:20] = minority
    block = block.reshape(8, 8)
    for c in range(maps.shape[0]):
        maps[c, 8 * cy: 8 * cy + 8, 8 * cx: 8 * cx + 8] = 255 * (block == c)


def test_cell_seed_labels_follow_psas_rule_on_hand_made_scores():
    # channels: 0 background, 1 and 2 the image's two tagged classes; a crop of 24 x 16 = 3 x 2 cells
    low, high = np.zeros((2, 3, 24, 16), np.uint8)
    _cell(low, 0, 0, majority=1, minority=0)    # low: class 1 on average (top-left pixel: bg)
    _cell(high, 0, 0, majority=1, minority=0)   #   high: class 1              -> 1
    _cell(low, 0, 1, majority=0, minority=1)    # low: bg on average (top-left: class 1)
    _cell(high, 0, 1, majority=1, minority=0)   #   high: not bg               -> 255
    _cell(low, 1, 0, majority=2, minority=1)    # low: class 2
    _cell(high, 1, 0, majority=0, minority=2)   #   high: bg wins over low     -> 0
    _cell(low, 1, 1, majority=2, minority=0)    # low: class 2, high: class 2  -> 2
    _cell(high, 1, 1, majority=2, minority=0)
    _cell(low, 2, 0, majority=1, minority=1)    # half of the cell is crop padding (all zero):
    _cell(high, 2, 0, majority=1, minority=1)   #   the rest decides           -> 1
    low[:, 16:, 4:8] = high[:, 16:, 4:8] = 0
    #                                             cell (2, 1) is all padding   -> 255
    seeds = cell_seed_labels(torch.from_numpy(np.stack([low, high])))
    expected = torch.tensor([[1, 255], [0, 2], [1, 255]])
    assert seeds.dtype == torch.int64 and torch.equal(seeds, expected)
    # nearest sampling of the hard seed map (the old rule) reads the top-left pixels instead
    assert low[:, 0, 0].argmax() == 0 and low[:, 0, 8].argmax() == 1


def test_cell_seed_labels_pad_partial_cells_like_block_reduce():
    scores = torch.zeros(2, 2, 10, 9, dtype=torch.uint8)
    scores[:, 1] = 255                            # everywhere class 1 in both maps
    scores[:, 0, 8:, :] = 255                     # the last two rows: bg in both maps
    scores[:, 1, 8:, :] = 0
    # cells of rows 8-9 hold 2 (or 2 x 1) real rows of bg, zeros elsewhere: bg wins -> 0
    assert torch.equal(cell_seed_labels(scores), torch.tensor([[1, 1], [0, 0]]))


def test_affinity_augment_builds_labels_after_the_crop_with_padding():
    """An 8 x 12 image of class 1 in a 24-px crop: the cells the image touches are 1, the others
    (crop padding) 255, wherever the crop and the flip put the image."""
    config = replace(PAPER.affinity_train, crop_size=24)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    scores = np.zeros((2, 2, 8, 12), np.uint8)
    scores[:, 1] = 255
    torch.manual_seed(0)
    images, labels = TrainAugment(config).batch([rgb] * 6, [scores] * 6)
    assert labels.shape == (6, 3, 3)
    for image, label in zip(images, labels, strict=True):
        real = (image != 0).any(0).float()        # padding is exactly 0 after normalisation
        assert real.sum() == 8 * 12
        touched = F.max_pool2d(real[None, None], 8)[0, 0] > 0
        assert torch.equal(label, torch.where(touched, 1, 255))


# ---- row 3 / 4: psa's crops and scales ---------------------------------------------------------

def _windows(full: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [full[:, y:y + size, x:x + size] for y in range(full.shape[1] - size + 1)
            for x in range(full.shape[2] - size + 1)]


def test_affinity_training_transform_does_not_rescale():
    rgb = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    config = replace(PAPER.affinity_train, color_jitter=(0, 0, 0, 0), crop_size=24)
    full = to_tensor(rgb)
    candidates = _windows(full, 24) + _windows(full.flip(-1), 24)
    torch.manual_seed(0)
    images, _ = TrainAugment(config).batch([rgb] * 4)
    for image in images:
        assert any(torch.allclose(image, w, atol=1e-5) for w in candidates), "a crop of the native image"
    big = replace(config, crop_size=64)           # larger than the image: padded, never upscaled
    image, _ = TrainAugment(big)(rgb)
    rows, cols = (image != 0).any(0).nonzero(as_tuple=True)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (40, 30)


def test_cam_training_transform_resizes_the_long_side_to_256_512():
    rgb = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    config = replace(PAPER.cam_train, crop_size=600, color_jitter=(0, 0, 0, 0))
    torch.manual_seed(0)
    sides = []
    for _ in range(6):
        image, _ = TrainAugment(config)(rgb)
        rows, cols = (image != 0).any(0).nonzero(as_tuple=True)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert abs(width / height - 30 / 40) < 0.02
        sides.append(int(height))
    assert all(256 <= s <= 512 for s in sides) and len(set(sides)) > 1


def test_paper_training_settings_are_psas():
    """psa: train_cls.py / train_aff.py defaults (batch, epochs, crop, jitter, resize range)."""
    cam, aff = PAPER.cam_train, PAPER.affinity_train
    assert (cam.batch_size, cam.epochs, cam.crop_size, cam.resize_long) == (16, 15, 448, (256, 512))
    assert (aff.batch_size, aff.epochs, aff.crop_size, aff.resize_long) == (8, 8, 448, None)
    assert cam.color_jitter == aff.color_jitter == (0.3, 0.3, 0.3, 0.1)
    assert cam.freeze_pretrained and aff.freeze_pretrained
    assert not (DEMO.cam_train.freeze_pretrained or DEMO.affinity_train.freeze_pretrained)


# ---- row 5: psa's effective step ------------------------------------------------------------------

def _trajectory(lr: float, momentum: float, weight_decay: float, loss_scale: float,
                steps: int = 300) -> torch.Tensor:
    """A parameter under a constant-gradient loss (loss_scale * 0.3 * sum(p)) with weight decay."""
    p = nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([p], lr=lr, momentum=momentum, weight_decay=weight_decay)
    path = []
    for _ in range(steps):
        optimizer.zero_grad()
        (loss_scale * 0.3 * p.sum()).backward()
        optimizer.step()
        path.append(p.detach().clone())
    return torch.stack(path)


@pytest.mark.parametrize("kind, loss_scale", [("cam", 1.0), ("affinity", 4.0)])
def test_optimiser_takes_psas_effective_step(kind, loss_scale):
    """psa: SGD(lr 0.1, momentum = its weight decay 5e-4 by psa#28, weight decay 5e-4) on its loss;
    ours on our loss (AffinityNet's is 4x psa's). After the momentum's transient the parameters
    follow the same path (same step and same weight decay)."""
    config = PAPER.cam_train if kind == "cam" else PAPER.affinity_train
    net = nn.Linear(1, 1)
    net.param_groups = lambda: ([net.weight], [net.bias])
    group = make_optimizer(net, config).param_groups[0]
    psa = _trajectory(0.1, 5e-4, 5e-4, 1.0)
    ours = _trajectory(group["lr"], group["momentum"], group["weight_decay"], loss_scale)
    displacement = psa[-1] - 1.0
    assert torch.allclose(ours[-1] - 1.0, displacement, rtol=0.05)
    assert torch.allclose(ours[-1] - ours[-2], psa[-1] - psa[-2], rtol=0.02)


# ---- row 6: PIL bicubic scales --------------------------------------------------------------------

def test_pil_bicubic_resize_equals_pil_on_the_uint8_image():
    rgb = np.random.default_rng(3).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    for size in ((10, 17), (32, 51)):
        expected = to_tensor(np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BICUBIC)))
        got = resize_images(to_tensor(rgb)[None], size, "pil_bicubic")[0]
        assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(resize_images(to_tensor(rgb)[None], (10, 17), "bilinear")[0],
                              to_tensor(np.asarray(Image.fromarray(rgb).resize((17, 10), Image.BICUBIC))),
                              atol=1e-2)


class _RecordingCamNet(nn.Module):
    """cams(x): records its inputs; one class whose map is the mean intensity at stride 8."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return F.relu(F.avg_pool2d(x.mean(1, keepdim=True), 8, ceil_mode=True)) + 0.1


def test_tagged_cams_resize_scales_as_the_config_says():
    rgb = np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    net = _RecordingCamNet()
    tagged_cams(net, [to_tensor(rgb)], [np.array([1.0])], CamConfig(scales=(0.5,), flip=False))
    expected = to_tensor(np.asarray(Image.fromarray(rgb).resize((20, 12), Image.BICUBIC)))
    assert PAPER.cam.resample == "pil_bicubic" and torch.allclose(net.inputs[0][0], expected, atol=1e-5)
    net.inputs.clear()
    tagged_cams(net, [to_tensor(rgb)], [np.array([1.0])], DEMO.cam)  # the demo keeps bilinear
    bilinear = F.interpolate(to_tensor(rgb)[None], size=(12, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(net.inputs[0][:1], bilinear, atol=1e-6)


# ---- row 2 (stage B and the reader): seed-score files ------------------------------------------

def test_seed_scores_round_trip_and_labels_pass_through():
    rng = np.random.default_rng(5)
    low, high = (rng.dirichlet([1, 1, 1], size=(6, 7)).transpose(2, 0, 1) for _ in range(2))
    encoded = encode_seed_scores(low, high, np.array([3, 5]))
    decoded = decode_seed(encoded)
    assert _png_text(encoded, CLASSES_KEY) == "3,5"  # the label values of maps 1..n, kept in the PNG
    assert decoded.shape == (2, 3, 6, 7) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, quantize_scores(np.stack([low, high])))
    assert np.abs(decoded.astype(float) / 255 - np.stack([low, high])).max() <= 0.5 / 255 + 1e-6
    label = rng.integers(0, 3, (6, 7)).astype(np.uint8)
    assert np.array_equal(decode_seed(encode_label_png(label)), label)


def _png_text(data: bytes, key: str) -> str:
    return str(Image.open(io.BytesIO(data), formats=("PNG",)).info[key])


def _stage_b_batch(rgb: np.ndarray, cams: np.ndarray) -> dict:
    return {"image_id": np.array(["a"], object), "image": np.array(["a.png"], object),
            "tag_names": np.array(["b"], object), "rgb": _objects([rgb]), "cams": _objects([cams]),
            "class_ids": _objects([np.array([2])]), "stage": np.array([""], object),
            "error": np.array([""], object), "message": np.array([""], object)}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def test_stage_b_writes_crf_scores_for_the_paper_and_labels_for_the_demo(tmp_path):
    rgb = np.zeros((32, 40, 3), np.uint8)
    rgb[:, 20:] = 200
    cams = np.zeros((1, 32, 40), np.float16)
    cams[0, :, 20:] = 1.0
    out = SeedActor(PAPER.cam, num_classes=3)(_stage_b_batch(rgb, cams))
    scores = decode_seed(bytes(out["png"][0]))
    low, high = seed_crf_scores(rgb, cams.astype(np.float32), PAPER.cam)
    assert np.array_equal(scores, quantize_scores(np.stack([low, high])))
    assert _png_text(bytes(out["png"][0]), CLASSES_KEY) == "2"
    assert (scores[0].argmax(0)[:, 20:] == 1).all() and (scores[1].argmax(0)[:, :20] == 0).all()
    demo_out = SeedActor(DEMO.cam, num_classes=3)(_stage_b_batch(rgb, cams))
    demo = decode_label_png(bytes(demo_out["png"][0]))
    assert demo.shape == (32, 40) and set(np.unique(demo).tolist()) <= {0, 2, 255}
    # the seed fractions (background, 3 classes, ignore) are the demo seed map's, in both modes
    expected = [np.mean(demo == v) for v in (0, 1, 2, 3, 255)]
    for fractions in (out["seed_fractions"][0], demo_out["seed_fractions"][0]):
        assert np.allclose(fractions, expected, atol=1e-6) and expected[2] > 0.3
    # the training reader hands the scores on at the image size
    image_path, seed_path = tmp_path / "a.png", tmp_path / "seed.png"
    Image.fromarray(rgb).save(image_path)
    seed_path.write_bytes(bytes(out["png"][0]))
    decoded = decode_rows({"image_id": np.array(["a"], object), "image": np.array([str(image_path)], object),
                           "mask_uri": np.array([str(seed_path)], object)})
    assert decoded["error"][0] == "" and np.array_equal(decoded["mask"][0], scores)


# ---- row 7: the `psa` evaluation variant ----------------------------------------------------------

def test_psa_variant_scores_cams_with_a_constant_background(tmp_path):
    cams = torch.tensor([[[[0.1, 0.19, 0.21, 0.9]]]])
    assert torch.equal(with_constant_background(cams).argmax(1), torch.tensor([[[0, 0, 1, 1]]]))
    assert EVAL_VARIANTS[:2] == ("cam", "psa")
    # RefineActor: the CAM 0.15 (bg under psa's 0.2, fg under (1-max)^16 = 0.07) on the left half
    rgb = np.full((8, 8, 3), 128, np.uint8)
    cam = np.full((1, 8, 8), 0.6, np.float16)
    cam[0, :, :4] = 0.15
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 4:] = 1
    (tmp_path / "gt.png").write_bytes(encode_label_png(gt))
    batch = {"image_id": _objects(["a"]), "image": _objects(["a.png"]), "tag_names": _objects(["c"]),
             "rgb": _objects([rgb]), "class_ids": _objects([np.array([1])]), "cams": _objects([cam]),
             "walked": _objects([np.stack([np.full((1, 1), 0.1), np.full((1, 1), 0.9)]).astype(np.float32)]),
             "orig_height": np.array([8]), "orig_width": np.array([8]),
             "gt_uri": _objects([str(tmp_path / "gt.png")]), "stage": _objects([""]),
             "error": _objects([""]), "message": _objects([""])}
    out = RefineActor(PAPER.walk, PAPER.cam.alpha_low, num_classes=1, evaluate=True)(batch)
    assert out["error"][0] == ""
    # gt rows, pred columns, and last the predictions outside the classes
    assert out["cm_psa"][0].reshape(2, 3).tolist() == [[32, 0, 0], [0, 32, 0]]
    assert out["cm_cam"][0].reshape(2, 3).tolist() == [[0, 32, 0], [0, 32, 0]]


# ---- row 8: DeepLab-CRF-LargeFOV ------------------------------------------------------------------

def test_paper_deeplab_is_largefov_and_round_trips(tmp_path):
    assert PAPER.deeplab_train.segmentation_head == "largefov"
    assert DEMO.deeplab_train.segmentation_head == "aspp"
    net = build_network("deeplab", "tiny", 3, PAPER.deeplab_train.segmentation_head)
    assert isinstance(net, DeepLabLargeFOV) and isinstance(build_network("deeplab", "tiny", 3), DeepLab)
    assert (net.fc6.kernel_size, net.fc6.dilation, net.fc6.out_channels) == ((3, 3), (12, 12), 1024)
    assert (net.fc7.kernel_size, net.fc8.out_channels) == ((1, 1), 4)
    x = torch.randn(1, 3, 40, 56)
    assert net.eval()(x).shape == (1, 4, 5, 7)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    meta = {"kind": "deeplab", "backbone": "tiny", "num_classes": 3, "class_names": ["a", "b", "c"],
            "train": {"segmentation_head": "largefov"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded = load_trained(str(tmp_path / "model.pt"))
    assert isinstance(loaded, DeepLabLargeFOV)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


def test_metrics_of_a_run_resumed_over_older_eval_files_leave_out_the_psa_variant(tmp_path):
    """eval/ files written before the `psa` variant existed: a resumed run still scores the others."""
    import pyarrow as pa

    from psa_ray.pipeline.report import quality_sections, text_report
    from psa_ray.pipeline.scoring import evaluation
    from psa_ray.pipeline.writers import write_table

    cm = [3, 1, 0, 4]                              # 2 classes: gt rows, predictions columns
    before = ("cam", "cam_crf", "rw", "rw_crf")
    for name, variants in (("old", before), ("new", EVAL_VARIANTS)):
        write_table(str(tmp_path / "eval" / f"{name}.parquet"),
                    pa.table({"images": [1], **{f"cm_{v}": [cm] for v in variants}}))
        write_table(str(tmp_path / "shards" / f"{name}.parquet"), pa.table({"image_id": [name]}))
    metrics = evaluation(str(tmp_path), ["c"])
    assert "psa" not in metrics and metrics["images"] == 2
    assert metrics["rw"]["iou"] == [6 / 8, 8 / 10]  # IoU = TP / (gt + pred - TP), summed matrices
    printed = text_report(quality_sections({}, metrics))  # the IoU table the job prints
    assert "psa" not in printed and "rw_crf" in printed
