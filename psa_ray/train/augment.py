"""The paper's training augmentation with torchvision transforms v2, for an image and its optional mask.

Random long-side resize, horizontal flip, colour jitter, ImageNet normalisation and a random crop
(padded with 0 for the image, 255 = ignore for the mask), then stacked into a batch.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from psa_ray.config import TrainConfig
from psa_ray.models.inference import IMAGENET_MEAN, IMAGENET_STD

IGNORE = 255


class RandomLongSideResize(v2.Transform):
    """Resize so that the longer side is uniform in [low, high] (aspect ratio kept)."""

    def __init__(self, low: int, high: int):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        long_side = random.randint(self.low, self.high)
        scale = long_side / max(h, w)
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt, params: dict):
        return F.resize(inpt, params["size"], antialias=True)


class TrainAugment:
    """Callable turning (rgb uint8 [H,W,3], mask uint8 [H,W] | None) into ([3,S,S], [S,S] | None)."""

    def __init__(self, config: TrainConfig):
        brightness, contrast, saturation, hue = config.color_jitter
        self.transform = v2.Compose([
            RandomLongSideResize(*config.resize_long),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness, contrast, saturation, hue),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.RandomCrop(config.crop_size, pad_if_needed=True,
                          fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE}),
        ])

    def __call__(self, rgb: np.ndarray, mask: np.ndarray | None = None):
        image = tv_tensors.Image(torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1))
        if mask is None:
            return self.transform(image), None
        out_image, out_mask = self.transform(image, tv_tensors.Mask(torch.from_numpy(np.array(mask))))
        return out_image, out_mask

    def batch(self, rgbs: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None):
        """Augment each sample and stack: images [B,3,S,S] float, masks [B,S,S] int64 or None."""
        pairs = [self(rgb, None if masks is None else masks[i]) for i, rgb in enumerate(rgbs)]
        images = torch.stack([p[0].as_subclass(torch.Tensor) for p in pairs])
        if masks is None:
            return images, None
        return images, torch.stack([p[1].as_subclass(torch.Tensor) for p in pairs]).long()
