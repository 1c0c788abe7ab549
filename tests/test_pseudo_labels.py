"""The per-image method (psa_ray.ops.pseudo_labels): sizes through the walk, labels from scores."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from psa_ray.config import CrfConfig, WalkConfig
from psa_ray.models.networks import build_model
from psa_ray.ops.pseudo_labels import crf_scores, scores_to_labels, upsample_scores, walk_scores, walk_size


@pytest.mark.parametrize("height, width, min_side, expected", [
    (128, 96, 320, (427, 320)),     # upscaled: short side 96 -> 320
    (500, 375, 320, (500, 375)),    # photo-sized: unchanged
    (100, 100, 0, (100, 100)),      # 0: never upscaled
])
def test_walk_size(height, width, min_side, expected):
    assert walk_size(height, width, min_side) == expected


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
    walked = walk_scores(net, image, cams, config)
    grid = walk_size(45, 70, min_side)
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
