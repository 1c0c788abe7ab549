"""What differs between the three networks: the model, its target and its loss. The loop is shared."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from psa_ray.config import TrainConfig
from psa_ray.models.networks import build_model
from psa_ray.ops.affinity import affinity_labels, affinity_loss, feature_affinities
from psa_ray.io.palette import IGNORE


@dataclass(frozen=True)
class Task:
    """kind: checkpoint folder name; uses_mask: whether rows carry a `mask` (seeds or labels)."""

    kind: str
    uses_mask: bool
    loss: Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]

    def build(self, backbone: str, num_classes: int, head: str = "aspp") -> nn.Module:
        """The untrained network; `num_classes` counts foreground classes (DeepLab adds background;
        `head`: its segmentation head, see `models.networks.SEGMENTATION_HEADS`)."""
        if self.kind == "deeplab":
            return build_model(self.kind, backbone, num_classes + 1, head)
        return build_model(self.kind, backbone, num_classes if self.kind == "cam" else None)


def freezes_pretrained(config: TrainConfig, init: dict[str, Any] | None) -> bool:
    """Whether a run freezes psa's layers (`freeze_pretrained` of the network): the config asks for
    it and the backbone starts from weights (`backbone_weights`, or `init` from another network)."""
    return config.freeze_pretrained and bool(config.backbone_weights or init)


def cam_loss(model: nn.Module, images: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Multi-label soft margin loss on image-level tags [B,C]."""
    logits = model(images)
    loss = F.multilabel_soft_margin_loss(logits, batch["tags"])
    return loss, {"loss": loss.item()}


def make_affinity_loss(radius: int):
    def loss_fn(model: nn.Module, images: torch.Tensor, batch: dict[str, torch.Tensor]):
        """Affinity loss on pairs within `radius` of the seeds [B,H,W]: hard seed maps of the crop
        (nearest-sampled to the feature grid), or labels already on the grid (`augment`'s
        psa rule on seed scores), for which the sampling is the identity."""
        features = model(images)
        seeds = F.interpolate(batch["mask"][:, None].float(), size=features.shape[-2:],
                              mode="nearest")[:, 0].long()
        loss, parts = affinity_loss(feature_affinities(features, radius), affinity_labels(seeds, radius))
        return loss, {"loss": loss.item(), **parts}
    return loss_fn


def deeplab_loss(model: nn.Module, images: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Per-pixel cross-entropy on pseudo labels, ignore 255, logits upsampled to the crop."""
    logits = F.interpolate(model(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE)
    return loss, {"loss": loss.item()}


def get_task(kind: str, radius: int = 5) -> Task:
    if kind == "cam":
        return Task("cam", False, cam_loss)
    if kind == "affinity":
        return Task("affinity", True, make_affinity_loss(radius))
    if kind == "deeplab":
        return Task("deeplab", True, deeplab_loss)
    raise ValueError(f"unknown network {kind!r}; expected one of cam, affinity, deeplab")
