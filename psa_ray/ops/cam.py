"""Class activation maps: multi-scale + flip inference, per-class normalisation, background map."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from psa_ray.models.backbones import IMAGENET, Normalization
from psa_ray.models.inference import input_normalization
from psa_ray.ops.forward import precision, upscaled_size

NORM_EPS = 1e-5
# psa's CAM evaluation (`infer_cls.py`, out_cam_pred): a constant background score
PSA_EVAL_BACKGROUND = 0.2
RESAMPLES = ("bilinear", "pil_bicubic")


def resize_images(images: Tensor, size: tuple[int, int], resample: str,
                  normalization: Normalization = IMAGENET) -> Tensor:
    """Images [B,3,H,W] normalised with `normalization` -> [B,3,h,w] for size (h, w).

    "bilinear": `F.interpolate` of the normalised tensor (no antialias), on its device.
    "pil_bicubic": as psa, PIL bicubic on the uint8 image: the images are turned back into the
    uint8 pixels they were normalised from (exact: normalisation is affine and the error is far
    below half a grey level), resized on the CPU and normalised again.
    """
    if resample not in RESAMPLES:
        raise ValueError(f"unknown resample {resample!r}; valid: {', '.join(RESAMPLES)}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if resample == "bilinear":
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std).view(1, 3, 1, 1)
    pixels = ((images.detach().float().cpu() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    resized = [Image.fromarray(p.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.Resampling.BICUBIC)
               for p in pixels]
    out = torch.from_numpy(np.stack([np.asarray(r) for r in resized])).permute(0, 3, 1, 2).float() / 255.0
    return ((out - mean) / std).to(images.device, images.dtype)


def class_activation_maps(model: nn.Module, images: Tensor, scales: Sequence[float], flip: bool,
                          autocast: torch.dtype | None = None, resample: str = "bilinear",
                          min_side: int = 0) -> Tensor:
    """images [B,3,H,W] -> CAMs [B,C,H,W] float32, summed over scales (and horizontal flips), not normalised.

    `model.cams(x [B,3,h,w])` must return ReLU'd class activation maps [B,C,~h/8,~w/8]. Each
    scale s resizes the images to (round(H'*s), round(W'*s)), (H', W') = `upscaled_size(H, W,
    min_side)` (`resize_images` with `resample`, and the input normalisation of the model,
    `input_normalization`); the flipped copies run in the same batch, their maps are flipped back,
    and every map is upsampled to (H, W). With `autocast` (e.g. torch.bfloat16) the network runs in
    that precision.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
    if not scales:
        raise ValueError("at least one scale is needed")
    batch, _, height, width = images.shape
    base_height, base_width = upscaled_size(height, width, min_side)
    cams_of = cast(Callable[[Tensor], Tensor], model.cams)  # nn.Module types attributes Tensor | Module
    maps = []
    with torch.no_grad():
        for scale in scales:
            size = (round(base_height * scale), round(base_width * scale))
            scaled = resize_images(images, size, resample, input_normalization(model))
            if flip:
                scaled = torch.cat([scaled, scaled.flip(-1)])
            with precision(images.device, autocast):
                cams = cams_of(scaled).float()
            if flip:  # upsampling is linear and commutes with the flip, so add the pair first
                cams = cams[:batch] + cams[batch:].flip(-1)
            maps.append(F.interpolate(cams, size=(height, width), mode="bilinear", align_corners=False))
    return torch.stack(maps).sum(dim=0)


def normalize_cams(cams: Tensor, tags: Tensor) -> Tensor:
    """cams [B,C,H,W] (>= 0), tags [B,C] (0/1) -> [B,C,H,W] in [0, 1]: untagged classes zero,
    each tagged map divided by its max + 1e-5."""
    if cams.dim() != 4 or tags.shape != cams.shape[:2]:
        raise ValueError(f"cams must be [B,C,H,W] and tags [B,C], got {tuple(cams.shape)} and "
                         f"{tuple(tags.shape)}")
    kept = cams * (tags > 0).to(cams.dtype)[:, :, None, None]
    peak = kept.amax(dim=(2, 3), keepdim=True)
    return kept / (peak + NORM_EPS)


def with_background(cams: Tensor, alpha: float) -> Tensor:
    """cams [B,C,H,W] in [0, 1] -> [B,C+1,H,W] with the background (1 - max_c cams)^alpha first.

    With C = 0 (no class kept) the background is 1 everywhere.
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must be [B,C,H,W], got shape {tuple(cams.shape)}")
    batch, channels, height, width = cams.shape
    if channels:
        peak = cams.amax(dim=1, keepdim=True)
    else:
        peak = cams.new_zeros(batch, 1, height, width)
    background = (1.0 - peak).clamp(min=0.0).pow(alpha)
    return torch.cat([background, cams], dim=1)


def with_constant_background(cams: Tensor, background: float = PSA_EVAL_BACKGROUND) -> Tensor:
    """cams [B,C,H,W] in [0, 1] -> [B,C+1,H,W] with a constant background score first (psa's CAM
    evaluation: 0.2)."""
    if cams.dim() != 4:
        raise ValueError(f"cams must be [B,C,H,W], got shape {tuple(cams.shape)}")
    return torch.cat([torch.full_like(cams[:, :1], background), cams], dim=1)

