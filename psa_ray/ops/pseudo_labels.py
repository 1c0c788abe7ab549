"""The method per image, composed from the ops: CAMs -> seeds, and CAMs -> walk -> pseudo label.

Plain functions (no Ray). The network steps take a list of images (any sizes; images of one
size share a forward pass, and one random walk serves them all): the pipeline's actors pass a
batch, the sequential baseline in bench/ one image at a time. Class maps are kept only for the
image's tags: `class_ids` holds the label values (1..C) of the kept maps, and score arrays stack
background first, then `class_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
import torch
import torch.nn.functional as F
from torch import nn

from psa_ray.config import CamConfig, CrfConfig, WalkConfig
from psa_ray.ops.affinity import feature_affinities, confident_seeds
from psa_ray.ops.forward import map_same_shape, precision, upscaled_size
from psa_ray.ops.cam import class_activation_maps, normalize_cams, with_background, with_constant_background
from psa_ray.ops.crf import dense_crf
from psa_ray.ops.quality import edge_band, label_quality
from psa_ray.ops.random_walk import random_walk_many

STRIDE = 8


def tagged_cams(cam_net: nn.Module, images: Sequence[torch.Tensor], tags: Sequence[np.ndarray],
                config: CamConfig, autocast: torch.dtype | None = None) -> list[tuple[np.ndarray, torch.Tensor]]:
    """images[i] [3,H_i,W_i] normalised, tags[i] [C] multi-hot -> per image (class_ids [n] int64 in 1..C,
    cams [n,H_i,W_i] in [0,1]).

    Images of one size run through the network together. `autocast`: the precision of the
    network's inference (None: float32), see `class_activation_maps`.
    """
    def kept_cams(group: list[int]) -> list[tuple[np.ndarray, torch.Tensor]]:
        tag_tensor = torch.as_tensor(np.stack([np.asarray(tags[i]) for i in group]), dtype=torch.float32,
                                     device=images[group[0]].device)
        cams = class_activation_maps(cam_net, torch.stack([images[i] for i in group]), config.scales,
                                     config.flip, autocast, config.resample, config.min_side)
        cams = normalize_cams(cams, tag_tensor)
        present = [torch.nonzero(image_tags > 0).flatten() for image_tags in tag_tensor.unbind()]
        return [((p + 1).cpu().numpy().astype(np.int64), cams[n, p]) for n, p in enumerate(present)]

    return map_same_shape(kept_cams, images)


def scores_to_labels(scores: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """scores [n+1,H,W] (background, then class_ids) -> label map [H,W] uint8 with values 0 or class_ids."""
    lookup = np.concatenate([[0], class_ids]).astype(np.uint8)
    best: NDArray[np.intp] = np.argmax(scores, axis=0)
    return lookup[best]


def cam_scores(cams: np.ndarray, alpha: float) -> np.ndarray:
    """cams [n,H,W] in [0,1] -> scores [n+1,H,W] float32, the background (1 - max)^alpha first."""
    return with_background(torch.from_numpy(np.asarray(cams, np.float32))[None], alpha)[0].numpy()


def blend_scores(walked: np.ndarray, cams: np.ndarray, cam_weight: float) -> np.ndarray:
    """The final CRF's input [n+1,H,W]: (1 - cam_weight) walked + cam_weight CAM scores.

    Both are [n+1,H,W] in [0,1] with the same background power (the walk averages its input),
    so the CAM's evidence stays in the label where the walk's affinities leak a weakly
    connected object into the background (bench/README.md measures it); 0 is psa's rule.
    """
    if cam_weight == 0.0:
        return walked
    return (1.0 - cam_weight) * walked + cam_weight * cams


def restore_erased_classes(label: np.ndarray, cams: np.ndarray, class_ids: np.ndarray,
                           alpha: float) -> tuple[np.ndarray, list[int]]:
    """label [H,W] uint8, cams [n,H,W] (for class_ids) -> (label where no tagged class with a
    confident CAM region is missing, the classes restored). A class that ended with no pixels gets
    back the pixels where it wins over the background (1 - max)^alpha (stage B's alpha_low,
    confident foreground) and over the other classes; other pixels keep their class."""
    confident = scores_to_labels(cam_scores(cams, alpha), class_ids)
    label, restored = label.copy(), []
    for c in class_ids:
        if not (label == c).any() and (confident == c).any():
            label[confident == c] = c
            restored.append(int(c))
    return label, restored


def crf_scores(rgb: np.ndarray, scores: np.ndarray, config: CrfConfig) -> np.ndarray:
    """Dense CRF on per-pixel scores [n+1,H,W] (made into distributions first) -> [n+1,H,W]."""
    probs = scores / np.maximum(scores.sum(axis=0, keepdims=True), 1e-5)
    return dense_crf(rgb, probs.astype(np.float32), config)


def seed_crf_scores(rgb: np.ndarray, cams: np.ndarray, config: CamConfig) -> tuple[np.ndarray, np.ndarray]:
    """Stage B's CRF: cams [n,H,W] -> marginals (low, high) [n+1,H,W] float32, background first.

    The dense CRF runs on the CAMs with the background (1 - max)^alpha_low (confident
    foreground) and ^alpha_high (confident background), unnormalised, as psa's `infer_cls.py`.
    """
    low, high = (dense_crf(rgb, cam_scores(cams, alpha), config.crf)
                 for alpha in (config.alpha_low, config.alpha_high))
    return low, high


def seed_label(low: np.ndarray, high: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Stage B: confident seeds [H,W] uint8 (0 bg, class_ids fg, 255 don't care) from the
    `seed_crf_scores` (low, high) [n+1,H,W]: the per-pixel rule of `confident_seeds` on their argmax."""
    return confident_seeds(scores_to_labels(low, class_ids), scores_to_labels(high, class_ids))


def walk_scores(affinity_net: nn.Module, images: Sequence[torch.Tensor], cams: Sequence[torch.Tensor],
                config: WalkConfig, autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """Stage D on the feature grid: images[i] [3,H_i,W_i], cams[i] [n_i,H_i,W_i] -> walked scores
    [n_i+1,h_i,w_i] float32 per image.

    Each image and its CAMs are resized to `upscaled_size` (`config.min_side`) and zero-padded to a multiple of the
    stride, the scores (background (1 - max)^alpha first) are average-pooled to the stride-8 grid
    of AffinityNet's features, and `random_walk_many` spreads them with T = D^-1 A^beta for t
    steps, all images in one walk. Images of one walk size run through AffinityNet together.
    With `autocast` (e.g. torch.bfloat16) AffinityNet runs in that precision; the affinities
    and the walk are computed in float32.
    """
    padded, scores = [], []
    for image, image_cams in zip(images, cams, strict=True):
        height, width = image.shape[-2:]
        size = upscaled_size(height, width, config.min_side)
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            image_cams = F.interpolate(image_cams[None], size=size, mode="bilinear", align_corners=False)[0]
        pad = (0, -size[1] % STRIDE, 0, -size[0] % STRIDE)
        padded.append(F.pad(image, pad))
        with torch.inference_mode():
            background_first = with_background(image_cams[None], config.alpha)
            scores.append(F.avg_pool2d(F.pad(background_first, pad), STRIDE, STRIDE)[0].float())

    def group_affinities(group: list[int]) -> tuple[torch.Tensor, ...]:
        with precision(padded[group[0]].device, autocast):
            features: torch.Tensor = affinity_net(torch.stack([padded[i] for i in group]))
        return feature_affinities(features.float(), config.radius).unbind()

    with torch.inference_mode():
        affinities = map_same_shape(group_affinities, padded)
        scores = [s[:, : a.shape[-2], : a.shape[-1]] for s, a in zip(scores, affinities, strict=True)]
        return random_walk_many(affinities, scores, config.beta, config.t)


def upsample_scores(scores: torch.Tensor | np.ndarray, height: int, width: int,
                    config: WalkConfig) -> np.ndarray:
    """Walked scores [n+1,h,w] on the stride-8 grid of `walk_scores` -> [n+1,H,W] at the image size."""
    scores = torch.as_tensor(np.asarray(scores, np.float32))[None]
    walked = upscaled_size(height, width, config.min_side)
    full = F.interpolate(scores, size=(scores.shape[-2] * STRIDE, scores.shape[-1] * STRIDE),
                         mode="bilinear", align_corners=False)[..., : walked[0], : walked[1]]
    if walked != (height, width):
        full = F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)
    return full[0].numpy()


@dataclass(frozen=True)
class RefinedLabel:
    """Stage D's result for one image at its processing size [H,W]: the pseudo label, and what it
    was made from (for scoring and pictures)."""

    label: np.ndarray        # [H,W] uint8: 0 or class_ids, erased classes restored
    confidence: float        # the mean over pixels of the final CRF's top probability
    quality: float           # `ops.quality.label_quality` of the label before the restoring
    restored: list[int]      # the classes the walk erased, restored from the CAM
    cams: np.ndarray         # [n+1,H,W] CAM scores, background (1 - max)^alpha first
    walked: np.ndarray       # [n+1,H,W] the walked scores at the image size


def refine_label(rgb: np.ndarray, cams: np.ndarray, walked: np.ndarray, class_ids: np.ndarray,
                 config: WalkConfig, seed_alpha: float) -> RefinedLabel:
    """Stage D after the walk, for one image: rgb [H,W,3] uint8, cams [n,H,W] (for class_ids) and
    the walked scores [n+1,h,w] of `walk_scores` -> the pseudo label.

    The walked scores are blended with the CAM's (`blend_scores`, `config.cam_weight`) and refined
    by a dense CRF; the label is scored (`label_quality`, before the restoring, so that an image
    whose walk erased a class scores low) and a tagged class the walk erased gets back its
    confident CAM region (`restore_erased_classes` at `seed_alpha`, stage B's alpha_low).
    """
    height, width = rgb.shape[:2]
    walked = upsample_scores(walked, height, width, config)
    scores = cam_scores(cams, config.alpha)
    probs = crf_scores(rgb, blend_scores(walked, scores, config.cam_weight), config.crf)
    refined = scores_to_labels(probs, class_ids)
    band = edge_band(height, upscaled_size(height, width, config.min_side)[0], STRIDE)
    quality = label_quality(refined, scores_to_labels(walked, class_ids), band, class_ids)
    label, restored = restore_erased_classes(refined, cams, class_ids, seed_alpha)
    return RefinedLabel(label, float(probs.max(axis=0).mean()), quality, restored, scores, walked)


def label_variants(rgb: np.ndarray, cams: np.ndarray, refined: RefinedLabel, class_ids: np.ndarray,
                   config: CrfConfig) -> dict[str, np.ndarray]:
    """The labels [H,W] that evaluation compares, by name: the CAM's (`cam`: background
    (1 - max)^alpha; `psa`: psa's constant background), the CAM's after a CRF (`cam_crf`), the
    walk's (`rw`) and the final one (`rw_crf`)."""
    psa = with_constant_background(torch.from_numpy(np.asarray(cams, np.float32))[None])[0].numpy()
    return {"cam": scores_to_labels(refined.cams, class_ids), "psa": scores_to_labels(psa, class_ids),
            "cam_crf": scores_to_labels(crf_scores(rgb, refined.cams, config), class_ids),
            "rw": scores_to_labels(refined.walked, class_ids), "rw_crf": refined.label}
