"""Trained networks for inference: rebuilt from their exported files, placed, and run fast.

`export_network` writes a trained network as `model.pt` (a state dict) with a `meta.json` beside
it (`network_meta`: kind, backbone, classes, affinity radius, training config, input mean/std,
as timm's `PretrainedCfg`). `load_trained` rebuilds the network from both.

Speed on the inference paths (CAMs, AffinityNet features, DeepLab): weights in channels-last
memory format, and bf16 autocast where the device computes bf16 natively (CUDA GPUs with bf16,
CPUs whose oneDNN has bf16 kernels: AVX512-BF16 or AMX); callers cast the outputs back to float32.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from psa_ray.config import TrainConfig, to_dict
from psa_ray.io.storage import join, read_bytes, write_bytes
from psa_ray.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from psa_ray.models.networks import build_network
from psa_ray.models.weights import WeightsError, load_weights, read_state

MODEL_FILE, META_FILE = "model.pt", "meta.json"


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> float [3,H,W] scaled to [0, 1] and normalised with the ImageNet mean and
    std (the networks' input; training's augmentation ends with the same normalisation)."""
    image = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def network_meta(kind: str, config: TrainConfig, class_names: list[str], radius: int) -> dict[str, Any]:
    """meta.json of a network trained with `config` on `class_names` (foreground, in label order)."""
    return {"kind": kind, "backbone": config.backbone, "num_classes": len(class_names),
            "class_names": list(class_names), "radius": radius, "train": to_dict(config),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def export_network(state: dict[str, torch.Tensor], meta: dict[str, Any], folder: str) -> str:
    """Write a network's state dict and its meta.json (`network_meta`) to `<folder>/model.pt` and
    `<folder>/meta.json` (a local folder or s3:// prefix); returns the weights URI."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = join(folder, MODEL_FILE)
    write_bytes(weights, buffer.getvalue())
    write_bytes(join(folder, META_FILE), json.dumps(meta).encode())
    return weights


def read_meta(weights_uri: str) -> dict[str, Any]:
    """The meta.json written beside exported weights (kind, backbone, class names, config)."""
    folder = weights_uri.rsplit("/", 1)[0]
    try:
        meta: dict[str, Any] = json.loads(read_bytes(join(folder, META_FILE)))
    except FileNotFoundError:
        raise WeightsError(f"{weights_uri}: no {META_FILE} beside it (psa_ray writes one with every "
                           "trained network; pass the model.pt of a psa_ray training run)") from None
    return meta


def check_weights(option: str, uri: str | None, trained: bool = False) -> None:
    """Weights a job was given, checked on the driver before any work (a WeightsError that names
    `option`), not in every worker later: the file is a weights-only checkpoint and, for a network
    psa_ray trained (`trained`), has its meta.json beside it."""
    if uri is None:
        return
    try:
        read_state(uri)
        if trained:
            read_meta(uri)
    except WeightsError as e:
        raise WeightsError(f"{option} {e}") from None


def load_trained(weights_uri: str, device: torch.device | str = "cpu") -> nn.Module:
    """A network written by `export_network`, rebuilt from the meta.json beside its weights, in eval mode
    on `device`, channels-last."""
    meta = read_meta(weights_uri)
    head = meta.get("train", {}).get("segmentation_head", "aspp")  # older exports: ASPP
    model = build_network(meta["kind"], meta["backbone"], meta["num_classes"], head)
    load_weights(model, weights_uri)
    return model.to(device).to(memory_format=torch.channels_last).eval()


def inference_device() -> torch.device:
    """The device a process runs its networks on: its GPU if Ray gave it one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 convolutions natively (faster than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """The dtype to autocast network inference to on `device` (None: float32)."""
    return torch.bfloat16 if mixed_precision and native_bf16(device) else None
