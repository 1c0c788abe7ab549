"""Trained networks for inference: rebuilt from their exported files, placed, and run fast.

`fit` exports each network as `model.pt` (a state dict) with a `meta.json` beside it (kind,
backbone, classes, training config). `load_trained` rebuilds the network from both.

Speed on the inference paths (CAMs, AffinityNet features, DeepLab): weights in channels-last
memory format, and bf16 autocast where the device computes bf16 natively (CUDA GPUs with bf16,
CPUs whose oneDNN has bf16 kernels: AVX512-BF16 or AMX); callers cast the outputs back to float32.
On the synthetic demo, bf16 on a Zen 4 CPU changed the random walk's mIoU by 0.01 points.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from psa_ray.io.storage import join, read_bytes
from psa_ray.models.networks import build_model
from psa_ray.models.weights import WeightsError, load_weights

META_FILE = "meta.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> float [3,H,W] scaled to [0, 1] and normalised with the ImageNet mean and
    std (the networks' input; training's augmentation ends with the same normalisation)."""
    image = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def read_meta(weights_uri: str) -> dict[str, Any]:
    """The meta.json written beside exported weights (kind, backbone, class names, config)."""
    folder = weights_uri.rsplit("/", 1)[0]
    try:
        return json.loads(read_bytes(join(folder, META_FILE)))
    except FileNotFoundError:
        raise WeightsError(f"{weights_uri}: no {META_FILE} beside it (psa_ray writes one with every "
                           "trained network; pass the model.pt of a psa_ray training run)") from None


def load_trained(weights_uri: str, device: torch.device | str = "cpu") -> nn.Module:
    """A network exported by `fit`, rebuilt from the meta.json beside its weights, in eval mode
    on `device`, channels-last."""
    meta = read_meta(weights_uri)
    kind = meta["kind"]
    num_classes = {"cam": meta["num_classes"], "deeplab": meta["num_classes"] + 1}.get(kind)
    head = meta.get("train", {}).get("segmentation_head", "aspp")  # older exports: ASPP
    model = build_model(kind, meta["backbone"], num_classes, head)
    load_weights(model, weights_uri)
    return model.to(device, memory_format=torch.channels_last).eval()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 convolutions natively (faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """The dtype to autocast network inference to on `device` (None: float32)."""
    return torch.bfloat16 if mixed_precision and native_bf16(device) else None
