"""What differs between the three networks in training: their target and loss (the networks
themselves: `models.networks.NETWORKS`). The loop is shared."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from psa_ray.config import TrainConfig
from psa_ray.models.networks import network_spec
from psa_ray.ops.affinity import affinity_labels, affinity_loss, feature_affinities
from psa_ray.io.palette import IGNORE


Loss = Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Task:
    """kind: checkpoint folder name; uses_mask: whether rows carry a `mask` (seeds or labels)."""

    kind: str
    uses_mask: bool
    loss: Loss


@dataclass(frozen=True)
class Init:
    """Weights a network starts from: the model at `uri`, or only its backbone (e.g. AffinityNet
    from the trained CAM network)."""

    uri: str
    backbone_only: bool = True


def freezes_pretrained(config: TrainConfig, init: Init | None) -> bool:
    """Whether a run freezes psa's layers (`freeze_pretrained` of the network): the config asks for
    it and the backbone starts from weights (`backbone_weights`, or `init` from another network)."""
    return config.freeze_pretrained and bool(config.backbone_weights or init)


def cam_loss(model: nn.Module, images: torch.Tensor,
             batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-label soft margin loss on image-level tags [B,C]."""
    logits = model(images)
    loss = F.multilabel_soft_margin_loss(logits, batch["tags"])
    return loss, {"loss": loss.item()}


def make_affinity_loss(radius: int) -> Loss:
    def loss_fn(model: nn.Module, images: torch.Tensor,
                batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Affinity loss on pairs within `radius` of the seeds [B,H,W]: hard seed maps of the crop
        (nearest-sampled to the feature grid), or labels already on the grid (`augment`'s
        psa rule on seed scores), for which the sampling is the identity."""
        features = model(images)
        seeds = F.interpolate(batch["mask"][:, None].float(), size=features.shape[-2:],
                              mode="nearest")[:, 0].long()
        loss, parts = affinity_loss(feature_affinities(features, radius), affinity_labels(seeds, radius))
        return loss, {"loss": loss.item(), **parts}
    return loss_fn


def deeplab_loss(model: nn.Module, images: torch.Tensor,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pixel cross-entropy on pseudo labels, ignore 255, logits upsampled to the crop."""
    logits = F.interpolate(model(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE)
    return loss, {"loss": loss.item()}


# each kind's loss, from the affinity radius
LOSSES: dict[str, Callable[[int], Loss]] = {"cam": lambda radius: cam_loss, "affinity": make_affinity_loss,
                                            "deeplab": lambda radius: deeplab_loss}


def get_task(kind: str, radius: int = 5) -> Task:
    """The training task of a network kind (`models.networks.NETWORKS`)."""
    return Task(kind, network_spec(kind).mask_folder is not None, LOSSES[kind](radius))
