"""The per-image method (psa_ray.ops.pseudo_labels): sizes through the walk, labels from scores."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from psa_ray.config import CrfConfig, WalkConfig
from psa_ray.models.networks import build_model
from psa_ray.ops.forward import upscaled_size
from psa_ray.ops.pseudo_labels import (
    blend_scores, cam_scores, crf_scores, restore_erased_classes, scores_to_labels, upsample_scores, walk_scores)


@pytest.mark.parametrize("height, width, min_side, expected", [
    (128, 96, 320, (427, 320)),     # upscaled: short side 96 -> 320
    (500, 375, 320, (500, 375)),    # photo-sized: unchanged
    (100, 100, 0, (100, 100)),      # 0: never upscaled
])
def test_upscaled_size(height, width, min_side, expected):
    assert upscaled_size(height, width, min_side) == expected


@pytest.mark.parametrize("min_side", [0, 160])
def test_walk_then_upsample_gives_scores_at_image_size(min_side):
    """Whatever size the walk runs at, the scores come back at the image size, background first,
    and a class whose CAM covers the whole image keeps the argmax everywhere."""
    torch.manual_seed(0)
    net = build_model("affinity", "tiny", None).eval()
    image = torch.randn(3, 45, 70)
    cams = torch.zeros(2, 45, 70)
    cams[0] = 1.0                                     # class 1 everywhere, class 2 nowhere
    config = replace(WalkConfig(t=16), min_side=min_side)
    [walked] = walk_scores(net, [image], [cams], config)
    grid = upscaled_size(45, 70, min_side)
    assert walked.shape == (3, -(-grid[0] // 8), -(-grid[1] // 8))
    scores = upsample_scores(walked, 45, 70, config)
    assert scores.shape == (3, 45, 70)
    labels = scores_to_labels(scores, np.array([1, 2]))
    assert (labels == 1).all()


def test_crf_scores_accept_read_only_images():
    """Ray hands actors read-only arrays; the CRF must not need to write into them."""
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, 15:] = 255
    rgb.setflags(write=False)
    scores = np.stack([np.full((20, 30), 0.4), np.full((20, 30), 0.6)]).astype(np.float32)
    probs = crf_scores(rgb, scores, CrfConfig())
    assert probs.shape == (2, 20, 30)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-4)



def test_bf16_inference_gives_float32_scores_and_the_same_labels():
    """With bf16 autocast the networks run in bf16, but CAMs and walked scores come back float32
    and the walk's labels match float32 inference on nearly every pixel."""
    from psa_ray.config import CamConfig
    from psa_ray.ops.pseudo_labels import tagged_cams

    torch.manual_seed(0)
    cam_net = build_model("cam", "tiny", 3).eval()
    affinity_net = build_model("affinity", "tiny", None).eval()
    image = torch.randn(3, 128, 192)
    image[:, :, 96:] += 2.0                           # two regions the features can tell apart
    cams = torch.zeros(2, 128, 192)
    cams[0, 16:112, 8:88] = torch.linspace(1.0, 0.3, 80)   # a partial CAM in each region
    cams[1, 16:112, 104:184] = torch.linspace(0.3, 1.0, 80)
    config = WalkConfig(t=16)
    labels = {}
    for autocast in (None, torch.bfloat16):
        [(_, tagged)] = tagged_cams(cam_net, [image], [np.array([1.0, 0.0, 1.0], np.float32)],
                                    CamConfig(scales=(0.5, 1.0)), autocast)
        [walked] = walk_scores(affinity_net, [image], [cams], config, autocast)
        assert tagged.dtype == walked.dtype == torch.float32
        labels[autocast] = scores_to_labels(upsample_scores(walked, 128, 192, config), np.array([1, 3]))
    assert set(np.unique(labels[None])) == {0, 1, 3}
    assert (labels[None] == labels[torch.bfloat16]).mean() > 0.97


def test_a_batch_of_mixed_sizes_gives_each_image_what_it_gets_alone():
    """tagged_cams and walk_scores on three images (two of one size, sharing a forward pass, and
    one other; different tags): each image's CAMs and walked scores equal those of a call on it
    alone."""
    from psa_ray.config import CamConfig
    from psa_ray.ops.pseudo_labels import tagged_cams

    torch.manual_seed(0)
    cam_net = build_model("cam", "tiny", 3).eval()
    affinity_net = build_model("affinity", "tiny", None).eval()
    images = [torch.randn(3, 40, 56), torch.randn(3, 48, 40), torch.randn(3, 40, 56)]
    tags = [np.array(t, np.float32) for t in ([1, 0, 1], [0, 1, 0], [1, 1, 1])]
    cam_config, walk_config = CamConfig(scales=(0.5, 1.0)), WalkConfig(t=64, min_side=48)
    batched = tagged_cams(cam_net, images, tags, cam_config)
    walked = walk_scores(affinity_net, images, [cams for _, cams in batched], walk_config)
    for image, image_tags, (class_ids, cams), scores in zip(images, tags, batched, walked, strict=True):
        [(keys_alone, cams_alone)] = tagged_cams(cam_net, [image], [image_tags], cam_config)
        np.testing.assert_array_equal(class_ids, keys_alone)
        torch.testing.assert_close(cams, cams_alone, rtol=1e-4, atol=1e-5)
        [alone] = walk_scores(affinity_net, [image], [cams_alone], walk_config)
        grid = [-(-s // 8) for s in upscaled_size(*image.shape[1:], 48)]
        assert scores.shape == alone.shape == (len(class_ids) + 1, *grid)
        torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-5)


def test_blend_keeps_the_cams_evidence_where_the_walk_lost_it():
    """A class the walk shrank to a weak score keeps the pixels where its CAM is strong; weight 0
    is psa's rule (the walked scores as they are)."""
    cams = np.zeros((1, 4, 4), np.float32)
    cams[0, :, :2] = 0.9                              # the class's CAM on the left half
    walked = cam_scores(np.full((1, 4, 4), 0.05, np.float32), 16.0)  # the walk washed it out
    class_ids = np.array([3])
    assert np.all(scores_to_labels(blend_scores(walked, cam_scores(cams, 16.0), 0.0), class_ids) == 0)
    blended = scores_to_labels(blend_scores(walked, cam_scores(cams, 16.0), 0.5), class_ids)
    assert np.all(blended[:, :2] == 3) and np.all(blended[:, 2:] == 0)


def test_an_erased_class_gets_back_its_confident_cam_region_only():
    cams = np.zeros((2, 6, 6), np.float32)             # classes 2 and 5
    cams[0, :3] = 0.8                                 # class 2 confident on the top half
    cams[1, 3:, :2] = 0.9                             # class 5 confident in the bottom-left corner
    cams[1, 3:, 2:] = 0.2                             # and weak elsewhere: background wins there
    label = np.zeros((6, 6), np.uint8)
    label[:3] = 2                                     # the walk kept class 2, erased class 5
    restored, classes = restore_erased_classes(label, cams, np.array([2, 5]), alpha=4.0)
    assert np.all(restored[:3] == 2) and np.all(restored[3:, :2] == 5) and np.all(restored[3:, 2:] == 0)
    assert classes == [5]
    # a class the label still has is left as it is, and so is a class with no confident region
    label[5, 5] = 5
    assert restore_erased_classes(label, cams, np.array([2, 5]), alpha=4.0)[1] == []
    assert np.array_equal(restore_erased_classes(label, cams, np.array([2, 5]), alpha=4.0)[0], label)
    weak = np.full((1, 6, 6), 0.1, np.float32)
    kept, none = restore_erased_classes(np.zeros((6, 6), np.uint8), weak, np.array([1]), alpha=4.0)
    assert np.all(kept == 0) and none == []
