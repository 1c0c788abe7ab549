"""The method for one image, composed from the ops: CAMs -> seeds, and CAMs -> walk -> pseudo label.

Plain functions (no Ray). The pipeline's actors call them on each row; the sequential baseline
in bench/ calls the same ones. Class maps are kept only for the image's tags: `keys` holds the
label values (1..C) of the kept maps, and score arrays stack background first, then `keys`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from psa_ray.config import CamConfig, CrfConfig, WalkConfig
from psa_ray.ops.affinity import feature_affinities, seed_labels
from psa_ray.ops.cam import class_activation_maps, normalize_cams, with_background
from psa_ray.ops.crf import dense_crf
from psa_ray.ops.random_walk import random_walk

STRIDE = 8


def tagged_cams(cam_net: nn.Module, image: torch.Tensor, tags: np.ndarray, config: CamConfig,
                autocast: torch.dtype | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """image [3,H,W] normalised, tags [C] multi-hot -> (keys [n] int64 in 1..C, cams [n,H,W] in [0,1]).

    `autocast`: the precision of the network's inference (None: float32), see `class_activation_maps`.
    """
    tag_tensor = torch.as_tensor(np.asarray(tags), dtype=torch.float32, device=image.device)[None]
    cams = class_activation_maps(cam_net, image[None], config.scales, config.flip, autocast)
    cams = normalize_cams(cams, tag_tensor)[0]
    present = torch.nonzero(tag_tensor[0] > 0).flatten()
    return (present + 1).cpu().numpy().astype(np.int64), cams[present]


def scores_to_labels(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """scores [n+1,H,W] (background, then keys) -> label map [H,W] uint8 with values 0 or keys."""
    lookup = np.concatenate([[0], keys]).astype(np.uint8)
    return lookup[np.argmax(scores, axis=0)]


def crf_scores(rgb: np.ndarray, scores: np.ndarray, config: CrfConfig) -> np.ndarray:
    """Dense CRF on per-pixel scores [n+1,H,W] (made into distributions first) -> [n+1,H,W]."""
    probs = scores / np.maximum(scores.sum(axis=0, keepdims=True), 1e-5)
    return dense_crf(rgb, probs.astype(np.float32), config)


def seed_label(rgb: np.ndarray, cams: np.ndarray, keys: np.ndarray, config: CamConfig) -> np.ndarray:
    """Stage B: confident seeds [H,W] uint8 (0 bg, keys fg, 255 don't care) from cams [n,H,W].

    The CRF runs on the CAMs with background power alpha_low (confident foreground) and
    alpha_high (confident background), as in the reference's seed extraction.
    """
    cams_t = torch.from_numpy(np.asarray(cams, np.float32))[None]
    labels = []
    for alpha in (config.alpha_low, config.alpha_high):
        scores = with_background(cams_t, alpha)[0].numpy()
        labels.append(scores_to_labels(dense_crf(rgb, scores, config.crf), keys))
    return seed_labels(labels[0], labels[1])


def walk_size(height: int, width: int, min_side: int) -> tuple[int, int]:
    """The size an image is walked at: upscaled so that its short side is at least min_side.

    At stride 8 a small image leaves few feature cells per object (a 128 px image: 16 x 16),
    too coarse for the walk to follow its edges; photos of ~500 px need no upscaling.
    """
    scale = max(1.0, min_side / min(height, width))
    return round(height * scale), round(width * scale)


def walk_scores(affinity_net: nn.Module, image: torch.Tensor, cams: torch.Tensor,
                config: WalkConfig, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Stage D on the feature grid: image [3,H,W], cams [n,H,W] -> walked scores [n+1,h,w] float32.

    Image and CAMs are resized to `walk_size` and zero-padded to a multiple of the stride, the
    scores (background (1 - max)^alpha first) are average-pooled to the stride-8 grid of
    AffinityNet's features, and `random_walk` spreads them with T = D^-1 A^beta for t steps.
    With `autocast` (e.g. torch.bfloat16) AffinityNet runs in that precision; the affinities
    and the walk are computed in float32.
    """
    size = walk_size(*image.shape[-2:], config.min_side)
    if size != tuple(image.shape[-2:]):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        cams = F.interpolate(cams[None], size=size, mode="bilinear", align_corners=False)[0]
    height, width = size
    pad = (0, -width % STRIDE, 0, -height % STRIDE)
    with torch.inference_mode():
        with torch.autocast(image.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            features = affinity_net(F.pad(image, pad)[None])
        scores = F.avg_pool2d(F.pad(with_background(cams[None], config.alpha), pad), STRIDE, STRIDE)
        scores = scores[..., : features.shape[-2], : features.shape[-1]]
        affinities = feature_affinities(features.float(), config.radius)
        return random_walk(affinities, scores.float(), config.beta, config.t)[0]


def upsample_scores(scores: torch.Tensor | np.ndarray, height: int, width: int,
                    config: WalkConfig) -> np.ndarray:
    """Walked scores [n+1,h,w] on the stride-8 grid of `walk_scores` -> [n+1,H,W] at the image size."""
    scores = torch.as_tensor(np.asarray(scores, np.float32))[None]
    walked = walk_size(height, width, config.min_side)
    full = F.interpolate(scores, size=(scores.shape[-2] * STRIDE, scores.shape[-1] * STRIDE),
                         mode="bilinear", align_corners=False)[..., : walked[0], : walked[1]]
    if walked != (height, width):
        full = F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)
    return full[0].numpy()
