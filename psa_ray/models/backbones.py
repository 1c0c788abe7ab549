"""Backbones at output stride 8: the paper's ResNet-38 and a tiny CPU net written here, and any
timm model that timm can dilate to stride 8 (`resnet50`, `tf_efficientnet_lite0`, `convnext_tiny`...).

Every backbone maps a normalised RGB float image `[B,3,H,W]` (`Normalization`: ImageNet's
statistics, or what its weights were trained with) to the list of the
features of its last three stages, `[B,c_k,ceil(H/8),ceil(W/8)]` for the channels
`c_k = out_channels[k]` (exactly `H/8 x W/8` when H and W are multiples of 8). It has the
attributes `out_channels: tuple[int, int, int]`, `name: str` and `stem_modules: tuple[str, ...]`,
the names of the first submodules that stay frozen when it starts from pretrained weights (the
networks' `freeze_pretrained`).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psa_ray.errors import UserError

STRIDE = 8


@dataclass(frozen=True)
class Normalization:
    """A network's input: `(rgb / 255 - mean) / std` per channel; recorded in every exported
    network's meta.json (as timm's `pretrained_cfg`) and applied by every reader of images."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class PreActBlock(nn.Module):
    """ResNet-38's two-conv residual unit: BN-ReLU, 3x3 conv (stride), BN-ReLU, 3x3 conv.

    The shortcut is the identity, or a 1x1 conv of the pre-activated input where the shape
    changes. Parameter names follow jiwoon-ahn/psa (`bn_branch2a`, `conv_branch2a`, ...).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, first_dilation: int | None = None):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.conv_branch1 = (None if in_channels == out_channels and stride == 1
                             else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(block output, ReLU(BN(x))): the second is the reference's `conv4`/`conv5` feature."""
        preact = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(preact)
        residual = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(preact))))
        return shortcut + residual, preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class PreActBottleneck(nn.Module):
    """ResNet-38's bottleneck unit (out/4 -> out/2 -> out), pre-activated, with channel dropout
    before the 3x3 and the last 1x1 conv, and a projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int, dropout: float):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        preact = F.relu(self.bn_branch2a(x))
        h = self.conv_branch2a(preact)
        h = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(h))))
        h = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(h))))
        return self.conv_branch1(preact) + h, preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ResNet38d(nn.Module):
    """ResNet-38 (Wu et al., "Wider or Deeper", model A) with dilated last stages, as in psa.

    conv1a (3x3, 64) -> b2 (x3, 128, /2) -> b3 (x3, 256, /4) -> b4 (x6, 512, /8) ->
    b5 (x3, 1024, dilation 2) -> b6 (bottleneck 2048, dilation 4, dropout 0.3) ->
    b7 (bottleneck 4096, dilation 4, dropout 0.5) -> bn7 -> ReLU.
    Outputs, as the reference's `conv4, conv5, conv6`: ReLU(BN(b4 output)) [512],
    ReLU(BN(b5 output)) [1024], ReLU(bn7(b7 output)) [4096]. Module and parameter names are the
    reference's, so its checkpoints load by name (see `weights.py`).
    """

    name = "resnet38d"
    out_channels = (512, 1024, 4096)
    stem_modules = ("conv1a", "b2", "b2_1", "b2_2")  # psa's `not_training` (network/resnet38d.py)

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        # (name prefix, repeats, in, mid, out, stride of the first unit, first dilation, dilation)
        stages = [("b2", 3, 64, 128, 128, 2, 1, 1), ("b3", 3, 128, 256, 256, 2, 1, 1),
                  ("b4", 6, 256, 512, 512, 2, 1, 1), ("b5", 3, 512, 512, 1024, 1, 1, 2)]
        self.block_names: list[str] = []
        for prefix, repeats, cin, mid, cout, stride, first_dilation, dilation in stages:
            for i in range(repeats):
                block_name = prefix if i == 0 else f"{prefix}_{i}"
                block = (PreActBlock(cin, mid, cout, stride, dilation, first_dilation) if i == 0
                         else PreActBlock(cout, mid, cout, 1, dilation))
                self.add_module(block_name, block)
                self.block_names.append(block_name)
        self.b6 = PreActBottleneck(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = PreActBottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.conv1a(x)
        for block_name in self.block_names:
            block: PreActBlock = getattr(self, block_name)
            if block_name == "b5":
                x, conv4 = block.forward_with_preact(x)
            else:
                x = block(x)
        x, conv5 = self.b6.forward_with_preact(x)
        conv6 = F.relu(self.bn7(self.b7(x)))
        return [conv4, conv5, conv6]


class BasicBlock(nn.Module):
    """Post-activation residual unit: 3x3 conv (stride, dilation)-BN-ReLU-3x3 conv-BN, + shortcut
    (1x1 conv-BN where the shape changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (nn.Identity() if in_channels == out_channels and stride == 1 else
                         nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_channels)))

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + self.shortcut(x))


class TinyNet(nn.Module):
    """A small CNN (~0.5 M parameters) for the synthetic corpus on a CPU.

    stem (3x3 conv /2, 32) -> layer1 (/4, 48) -> layer2 (/8, 64) -> layer3 (dilation 2, 96) ->
    layer4 (dilation 4, 128); one residual unit per layer. Outputs layer2, layer3, layer4.
    """

    name = "tiny"
    out_channels = (64, 96, 128)
    stem_modules = ("stem",)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(32, 48, stride=2)
        self.layer2 = BasicBlock(48, 64, stride=2)
        self.layer3 = BasicBlock(64, 96, dilation=2)
        self.layer4 = BasicBlock(96, 128, dilation=4)

    def forward(self, x: Tensor) -> list[Tensor]:
        c2 = self.layer2(self.layer1(self.stem(x)))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


# The backbones written here; every other name is a timm model (`TimmBackbone`).
BACKBONES: dict[str, Callable[[], nn.Module]] = {
    ResNet38d.name: ResNet38d,
    TinyNet.name: TinyNet,
}


class BackboneError(UserError):
    """A backbone name that is neither ours nor a timm model that works at output stride 8."""


class TimmBackbone(nn.Module):
    """timm's model `name` as a backbone: built at output stride 8 without its classifier, never
    downloading (`pretrained=False`; weights come from `weights.load_weights`).

    Its three outputs are the two feature levels before the last (timm's `forward_intermediates`)
    and the features its ImageNet classifier pooled (`forward_features`: ResNet's layer4,
    EfficientNet's 1280-channel head conv after BN and ReLU6), on which the CAM is defined. The
    timm model's submodules are this module's own, under timm's names, so checkpoints of timm's
    layout load by name. The contract comes from timm's `feature_info`: the frozen stem is every
    module up to and including the first level at stride 4 (ResNet: conv1, bn1, act1, maxpool,
    layer1; EfficientNet: conv_stem, bn1, blocks.0, blocks.1). BackboneError for an unknown name or
    a model timm cannot dilate to stride 8.
    """

    def __init__(self, name: str):
        super().__init__()
        import timm  # here: importing timm costs a process about a second

        if not timm.is_model(name):
            raise BackboneError(f"unknown backbone {name!r}: neither one of {', '.join(sorted(BACKBONES))} "
                                f"nor a timm model (timm.list_models() lists them)")
        try:
            model: Any = timm.create_model(name, pretrained=False, num_classes=0, output_stride=STRIDE)
            info: list[dict[str, Any]] = model.feature_info
            self.levels = [len(info) - 3, len(info) - 2]
            for child_name, child in model.named_children():
                self.add_module(child_name, child)
            object.__setattr__(self, "timm_model", model)  # not a submodule: its children are ours
            with torch.no_grad():
                shapes = [tuple(f.shape[-2:]) for f in self.eval()(torch.zeros(1, 3, 64, 64))]
        except Exception as e:  # timm raises many types for an unsupported option
            raise BackboneError(f"timm cannot run {name!r} at output stride {STRIDE} "
                                f"({type(e).__name__}: {str(e).strip()[:200]}); pick a convolutional model "
                                "(resnet50, tf_efficientnet_lite0, convnext_tiny, regnety_016, ...)") from None
        if any(shape != (64 // STRIDE, 64 // STRIDE) for shape in shapes):
            raise BackboneError(f"timm's {name!r} gives features of {shapes} for a 64x64 image: it cannot "
                                f"be dilated to output stride {STRIDE}")
        self.name = name
        self.pretrained_cfg: dict[str, Any] = dict(model.pretrained_cfg)
        self.out_channels = (info[self.levels[0]]["num_chs"], info[self.levels[1]]["num_chs"], model.num_features)
        first_stride4 = next(level["module"] for level in info if level["reduction"] >= 4)
        self.stem_modules = tuple(modules_through(self, first_stride4))

    def forward(self, x: Tensor) -> list[Tensor]:
        final, intermediates = self.timm_model.forward_intermediates(x, indices=self.levels)
        return [*intermediates, final]

    timm_model: Any  # the timm model whose children these are (set in __init__)


def modules_through(model: nn.Module, last: str) -> list[str]:
    """The dotted names of the modules that run before `last` (a dotted submodule name, as in
    timm's `feature_info`: `layer1`, `blocks.1`, `stages.0`), and `last`, taking registration
    order for forward order (as timm's models do)."""
    names, prefix, module = [], "", model
    for part in last.split("."):
        for child_name, child in module.named_children():
            if child_name == part:
                module = child
                break
            names.append(prefix + child_name)
        prefix += part + "."
    return names + [last]


def build_backbone(name: str) -> nn.Module:
    """A freshly initialised backbone: one of `BACKBONES`, else a timm model (`TimmBackbone`)."""
    return BACKBONES[name]() if name in BACKBONES else TimmBackbone(name)


def default_normalization(name: str) -> Normalization:
    """The input normalisation of backbone `name` when its weights say nothing else: timm's
    pretrained config for a timm model (EfficientNet-Lite: 0.5, 0.5), ImageNet's for ours."""
    if name in BACKBONES:
        return IMAGENET
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    mean, std = (cfg.mean, cfg.std) if cfg else (IMAGENET.mean, IMAGENET.std)
    return Normalization((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


__all__ = ["BACKBONES", "IMAGENET", "BackboneError", "Normalization", "build_backbone", "default_normalization",
           "TimmBackbone",
           "ResNet38d", "TinyNet"]
