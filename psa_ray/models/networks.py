"""The three networks of the method, each a `backbone` submodule plus a new head.

All outputs are at the backbone's stride 8: `h, w = ceil(H/8), ceil(W/8)` for an input
`[B,3,H,W]`. The shared `backbone` name lets one network start from another's trained backbone:
`affinity_net.backbone.load_state_dict(cam_net.backbone.state_dict())`.
`param_groups()` splits the trainable parameters into (backbone, new layers) for the new layers'
10x rate; `freeze_pretrained()` freezes what psa freezes in a backbone that starts from weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import Parameter

from psa_ray.models.backbones import build_backbone


def _as_backbone(backbone: nn.Module | str) -> nn.Module:
    return build_backbone(backbone) if isinstance(backbone, str) else backbone


def _out_channels(backbone: nn.Module) -> tuple[int, int, int]:
    """A backbone's `out_channels` (every backbone has one; see backbones.py)."""
    return cast("tuple[int, int, int]", backbone.out_channels)


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Network(nn.Module):
    """A backbone plus new layers: every parameter outside `backbone` is a new layer's (the
    networks `build_network` makes)."""

    def __init__(self, backbone: nn.Module | str):
        super().__init__()
        self.backbone = _as_backbone(backbone)
        self.frozen_pretrained = False

    def param_groups(self) -> tuple[list[Parameter], list[Parameter]]:
        """(backbone parameters, new-layer parameters), the trainable ones only."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return ([p for p in self.backbone.parameters() if p.requires_grad],
                [p for p in self.parameters() if id(p) not in backbone_ids and p.requires_grad])

    def freeze_pretrained(self) -> None:
        """What jiwoon-ahn/psa freezes when the backbone starts from weights (resnet38d.py
        `not_training`, `train()`): every BatchNorm stays in eval mode (its running statistics
        are kept) with gamma and beta frozen, and the backbone's stem (`backbone.stem_modules`, e.g.
        ResNet-38's conv1a, b2, b2_1, b2_2) is frozen. Call before building the optimiser."""
        self.frozen_pretrained = True
        for norm in _batch_norms(self):
            norm.requires_grad_(False)
        for name in cast("tuple[str, ...]", self.backbone.stem_modules):
            self.backbone.get_submodule(name).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Network:
        super().train(mode)
        if self.frozen_pretrained:
            for norm in _batch_norms(self):
                norm.eval()
        return self


class CamNet(Network):
    """The classification network whose class activation maps seed the method.

    The classifier is a bias-free 1x1 conv on the last feature (the reference's `fc8`, Xavier
    init); training applies channel dropout to that feature first.
    """

    def __init__(self, backbone: nn.Module | str, num_classes: int, dropout: float = 0.5):
        super().__init__(backbone)
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(_out_channels(self.backbone)[-1], num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Image-level logits [B,num_classes]: the global average of the classifier map (pooling
        first, which equals it for a 1x1 conv without bias)."""
        feature = self.dropout(self.backbone(x)[-1])
        logits: Tensor = self.classifier(F.adaptive_avg_pool2d(feature, 1)).flatten(1)
        return logits

    def cams(self, x: Tensor) -> Tensor:
        """Class activation maps [B,num_classes,h,w]: ReLU of the classifier on the last feature,
        without dropout."""
        return F.relu(self.classifier(self.backbone(x)[-1]))


def default_feature_dims(out_channels: tuple[int, int, int]) -> tuple[int, int, int]:
    """The reference's reductions (512 -> 64, 1024 -> 128, 4096 -> 256, i.e. /8, /8, /16) scaled to
    a backbone's channels, at least 32 each: resnet38d (64, 128, 256), resnet50 (64, 128, 128),
    tiny (32, 32, 32)."""
    return cast("tuple[int, int, int]", tuple(max(32, c // r) for c, r in zip(out_channels, (8, 8, 16), strict=True)))


class AffinityNet(Network):
    """Features whose L1 distances give the semantic affinities between nearby pixels.

    Bias-free 1x1 convs reduce the last three backbone features to `feature_dims` (the
    reference's `f8_3, f8_4, f8_5`), each followed by an ELU; their concatenation goes through a
    bias-free 1x1 conv to `out_dim` (the reference's `f9`, default: the sum of `feature_dims`)
    and an ELU, as in jiwoon-ahn/psa.
    """

    def __init__(self, backbone: nn.Module | str, feature_dims: tuple[int, int, int] | None = None,
                 out_dim: int | None = None):
        super().__init__(backbone)
        out_channels = _out_channels(self.backbone)
        dims = tuple(feature_dims or default_feature_dims(out_channels))
        self.out_dim = out_dim or sum(dims)
        reduce = [nn.Conv2d(c, d, 1, bias=False) for c, d in zip(out_channels, dims, strict=True)]
        self.reduce = nn.ModuleList(reduce)
        self.fuse = nn.Conv2d(sum(dims), self.out_dim, 1, bias=False)
        for conv in reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)

    def forward(self, x: Tensor) -> Tensor:
        """Affinity features [B,out_dim,h,w]."""
        reduced = [F.elu(conv(f)) for conv, f in zip(self.reduce, self.backbone(x), strict=True)]
        return F.elu(self.fuse(torch.cat(reduced, dim=1)))



class DeepLabLargeFOV(Network):
    """DeepLab-CRF-LargeFOV's head (DeepLab v1, Chen et al., ICLR 2015), the network psa trained
    on its pseudo labels (psa#7), on the last backbone feature: fc6 a 3x3 conv of dilation 12 to
    1024 channels, ReLU, dropout 0.5; fc7 a 1x1 conv to 1024, ReLU, dropout 0.5; fc8 a 1x1 conv to
    the classes. On VGG-16 fc6/fc7 are ImageNet's fc layers; here they are new layers (Kaiming
    init), and fc8 is N(0, 0.01) as in DeepLab. `num_classes` counts background.
    """

    DILATION, HIDDEN, DROPOUT = 12, 1024, 0.5

    def __init__(self, backbone: nn.Module | str, num_classes: int):
        super().__init__(backbone)
        self.num_classes = num_classes
        self.fc6 = nn.Conv2d(_out_channels(self.backbone)[-1], self.HIDDEN, 3, padding=self.DILATION,
                             dilation=self.DILATION)
        self.fc7 = nn.Conv2d(self.HIDDEN, self.HIDDEN, 1)
        self.fc8 = nn.Conv2d(self.HIDDEN, num_classes, 1)
        self.dropout = nn.Dropout2d(self.DROPOUT)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(cast(Tensor, conv.bias))  # a Conv2d made with a bias
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(cast(Tensor, self.fc8.bias))

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits [B,num_classes,h,w]."""
        h = self.dropout(F.relu(self.fc6(self.backbone(x)[-1])))
        logits: Tensor = self.fc8(self.dropout(F.relu(self.fc7(h))))
        return logits


class DeepLab(Network):
    """DeepLab-v2's segmentation head on the last backbone feature: ASPP, four 3x3 convs with
    dilation rates 6, 12, 18 and 24 whose outputs are summed (weights N(0, 0.01), biases 0).

    `num_classes` counts every output label, background included.
    """

    RATES = (6, 12, 18, 24)

    def __init__(self, backbone: nn.Module | str, num_classes: int):
        super().__init__(backbone)
        self.num_classes = num_classes
        channels = _out_channels(self.backbone)[-1]
        aspp = [nn.Conv2d(channels, num_classes, 3, padding=rate, dilation=rate) for rate in self.RATES]
        self.aspp = nn.ModuleList(aspp)
        for conv in aspp:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(cast(Tensor, conv.bias))

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits [B,num_classes,h,w]."""
        feature = self.backbone(x)[-1]
        logits: Tensor = sum(conv(feature) for conv in self.aspp)
        return logits


SEGMENTATION_HEADS = {"largefov": DeepLabLargeFOV, "aspp": DeepLab}


@dataclass(frozen=True)
class NetworkSpec:
    """One of the method's networks: what it is, what it trains on, how to build it.

    mask_folder: the folder of a labeling output that holds its per-pixel training targets
    (None: it trains on image tags only). outputs(num_foreground): the network's output classes
    for a corpus of that many foreground classes (None: class-agnostic).
    """

    kind: str
    title: str
    mask_folder: str | None
    outputs: Callable[[int], int | None]
    build: Callable[[nn.Module | str, int | None, str], Network]  # (backbone, outputs, head)


def _counted(num_classes: int | None, kind: str) -> int:
    if num_classes is None or num_classes < 1:
        raise ValueError(f"a {kind!r} model needs num_classes >= 1; got {num_classes}")
    return num_classes


def _affinity(backbone: nn.Module | str, num_classes: int | None, head: str) -> Network:
    if num_classes is not None:
        raise ValueError(f"AffinityNet has no classes; got num_classes={num_classes}")
    return AffinityNet(backbone)


NETWORKS: dict[str, NetworkSpec] = {spec.kind: spec for spec in (
    NetworkSpec("cam", "the CAM (classification) network on image tags", None, lambda n: n,
                lambda backbone, n, head: CamNet(backbone, _counted(n, "cam"))),
    NetworkSpec("affinity", "AffinityNet on stage-B seed labels", "seeds", lambda n: None, _affinity),
    NetworkSpec("deeplab", "DeepLab on pseudo labels", "labels", lambda n: n + 1,  # + background
                lambda backbone, n, head: SEGMENTATION_HEADS[head](backbone, _counted(n, "deeplab"))),
)}


def network_spec(kind: str) -> NetworkSpec:
    """The registry entry of a network kind; ValueError names the valid kinds."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; valid kinds: {', '.join(NETWORKS)}")
    return NETWORKS[kind]


def build_model(kind: str, backbone: str, num_classes: int | None, head: str = "aspp") -> Network:
    """A freshly initialised network with `num_classes` outputs: "cam" (foreground classes),
    "affinity" (num_classes must be None) or "deeplab" (background included; `head` one of
    SEGMENTATION_HEADS, "aspp" for checkpoints exported before the choice existed)."""
    spec = network_spec(kind)
    if head not in SEGMENTATION_HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; valid: {', '.join(SEGMENTATION_HEADS)}")
    return spec.build(backbone, num_classes, head)


def build_network(kind: str, backbone: str, num_foreground: int, head: str = "aspp") -> Network:
    """A freshly initialised network for a corpus of `num_foreground` classes."""
    return build_model(kind, backbone, network_spec(kind).outputs(num_foreground), head)
