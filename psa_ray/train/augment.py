"""psa's training augmentation with torchvision transforms v2, for an image and its optional target.

Random long-side resize (none when `resize_long` is None: psa's AffinityNet training), horizontal
flip, colour jitter, the network's input normalisation and a random crop (padded with 0 for the image, 255 =
ignore for a label mask, 0 for seed scores), then stacked into a batch. The target is a label map
[H,W] (seeds, pseudo labels) or stage-B seed scores [2,n+1,H,W] (`io.seeds`); scores are turned
into AffinityNet's labels on the stride-8 grid after the crop (`ops.affinity.cell_seed_labels`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from psa_ray.config import TrainConfig
from psa_ray.io.palette import IGNORE
from psa_ray.models.backbones import IMAGENET, Normalization
from psa_ray.ops.affinity import cell_seed_labels



class SeedScores(tv_tensors.Mask):
    """Stage-B seed scores [2,n+1,H,W] uint8: cropped and flipped like a mask, padded with 0."""


class RandomLongSideResize(v2.Transform):
    """Resize so that the longer side is uniform in [low, high] (aspect ratio kept)."""

    def __init__(self, low: int, high: int):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        long_side = int(torch.randint(self.low, self.high + 1, ()))  # torch's RNG: seeded per worker
        scale = long_side / max(h, w)
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


class TrainAugment:
    """Callable turning (rgb uint8 [H,W,3], target uint8 [H,W] or [2,n+1,H,W] | None) into
    ([3,S,S], target [S,S] or [2,n+1,S,S] | None)."""

    def __init__(self, config: TrainConfig, normalization: Normalization = IMAGENET):
        brightness, contrast, saturation, hue = config.color_jitter
        resize = [] if config.resize_long is None else [RandomLongSideResize(*config.resize_long)]
        self.transform = v2.Compose([
            *resize,
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness, contrast, saturation, hue),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(normalization.mean, normalization.std),
            v2.RandomCrop(config.crop_size, pad_if_needed=True,
                          fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE, SeedScores: 0}),
        ])

    def __call__(self, rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = tv_tensors.Image(torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1))
        if mask is None:
            return self.transform(image), None
        target = torch.from_numpy(np.array(mask))
        target = target.as_subclass(SeedScores) if target.dim() == 4 else tv_tensors.Mask(target)
        augmented: tuple[torch.Tensor, torch.Tensor] = self.transform(image, target)
        return augmented

    def batch(self, rgbs: Sequence[np.ndarray],
              masks: Sequence[np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment each sample and stack: images [B,3,S,S] float, targets int64 or None: label
        masks [B,S,S], or for seed scores the labels of `cell_seed_labels` [B,ceil(S/8),ceil(S/8)]."""
        pairs = [self(rgb, None if masks is None else masks[i]) for i, rgb in enumerate(rgbs)]
        images = torch.stack([p[0].as_subclass(torch.Tensor) for p in pairs])
        if masks is None:
            return images, None
        # with masks, each pair has its target
        targets = [cell_seed_labels(p[1]) if isinstance(p[1], SeedScores) else cast(torch.Tensor, p[1]) for p in pairs]
        return images, torch.stack([t.as_subclass(torch.Tensor) for t in targets]).long()
