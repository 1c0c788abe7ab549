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
import subprocess
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from psa_ray.config import TrainConfig, to_dict
from psa_ray.errors import UserError
from psa_ray.io.storage import join, read_bytes, write_bytes
from psa_ray.models.backbones import IMAGENET, Normalization
from psa_ray.models.networks import build_network
from psa_ray.models.weights import WeightsError, load_weights, read_state, weights_normalization

MODEL_FILE, META_FILE = "model.pt", "meta.json"
MIN_DRIVER = {"12": "525", "13": "580"}  # CUDA major version -> the oldest NVIDIA driver that runs it


def to_tensor(rgb: np.ndarray, normalization: Normalization = IMAGENET) -> torch.Tensor:
    """uint8 [H,W,3] -> float [3,H,W] scaled to [0, 1] and normalised with the network's mean and
    std (`input_normalization`; training's augmentation ends with the same normalisation)."""
    image = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(normalization.mean).view(3, 1, 1)
    std = torch.tensor(normalization.std).view(3, 1, 1)
    return (image - mean) / std


def model_input(rgb: np.ndarray, model: nn.Module) -> torch.Tensor:
    """uint8 [H,W,3] -> [3,H,W] as `model` reads it: normalised with its `input_normalization`, on
    its device (a CAM network and an AffinityNet of another backbone read it differently)."""
    return to_tensor(rgb, input_normalization(model)).to(next(model.parameters()).device)


def network_meta(kind: str, config: TrainConfig, class_names: list[str], radius: int,
                 normalization: Normalization | None = None) -> dict[str, Any]:
    """meta.json of a network trained with `config` on `class_names` (foreground, in label order),
    fed images normalised with `normalization` (None: as its backbone weights expect,
    `weights.weights_normalization`)."""
    normalization = normalization or weights_normalization(config.backbone_weights, config.backbone)
    return {"kind": kind, "backbone": config.backbone, "num_classes": len(class_names),
            "class_names": list(class_names), "radius": radius, "train": to_dict(config),
            "mean": list(normalization.mean), "std": list(normalization.std)}


def meta_normalization(meta: dict[str, Any]) -> Normalization:
    """The input normalisation recorded in a network's meta.json (ImageNet's in older exports)."""
    mean, std = meta.get("mean", IMAGENET.mean), meta.get("std", IMAGENET.std)
    return Normalization((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


def input_normalization(model: nn.Module) -> Normalization:
    """The input normalisation of a network from `load_trained` (ImageNet's for any other)."""
    normalization = getattr(model, "normalization", IMAGENET)
    assert isinstance(normalization, Normalization)
    return normalization


def export_network(state: dict[str, torch.Tensor], meta: dict[str, Any], folder: str) -> str:
    """Write a network's state dict (its tensors copied to the CPU, wherever they were) and its
    meta.json (`network_meta`) to `<folder>/model.pt` and `<folder>/meta.json` (a local folder or
    s3:// prefix); returns the weights URI."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)  # loadable on a CPU-only head
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
    on `device`, channels-last, with the input normalisation it was trained with (`input_normalization`)."""
    meta = read_meta(weights_uri)
    head = meta.get("train", {}).get("segmentation_head", "aspp")  # older exports: ASPP
    model = build_network(meta["kind"], meta["backbone"], meta["num_classes"], head)
    load_weights(model, weights_uri)
    # read by `input_normalization`; setattr: nn.Module.__setattr__ types values Tensor | Module for mypy
    setattr(model, "normalization", meta_normalization(meta))  # noqa: B010
    return model.to(device).to(memory_format=torch.channels_last).eval()


class GpuUnusableError(UserError):
    """A GPU this process was given that the installed torch cannot use (driver, compute capability)."""


def arch_supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether torch built for `arch_list` (`torch.cuda.get_arch_list()`: sm_XY kernels, compute_XY
    PTX) runs on a GPU of compute `capability`: an sm_XY kernel runs on X.Y up to X.9, PTX on X.Y and up."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        arch_major, arch_minor = int(number[:-1]), int(number[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def _gpu_facts() -> str:
    """The GPUs' name, compute capability and driver version, as nvidia-smi reports them."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed ({type(e).__name__}), GPU and driver unknown"
    return "name, compute capability, driver: " + "; ".join(out.strip().splitlines())


def _cuda_init_error() -> str:
    """Why CUDA does not initialise, as torch says it."""
    try:
        torch.zeros(1, device="cuda")
    except Exception as e:  # the reason is the message
        return f"{type(e).__name__}: {e}"
    return "torch.cuda.is_available() is false"


def cuda_requirements() -> str:
    """What the installed torch needs of a GPU: its compute capabilities and the minimum driver."""
    cuda = torch.version.cuda or "none"
    driver = MIN_DRIVER.get(cuda.split(".")[0], "?")
    return (f"torch {torch.__version__} is built for CUDA {cuda} (NVIDIA driver {driver} or newer) with "
            f"kernels for {' '.join(torch.cuda.get_arch_list()) or 'no GPU'}")


def check_cuda(granted_gpus: Sequence[object]) -> None:
    """Raise GpuUnusableError unless CUDA works here and the installed torch has kernels for the
    GPU; `granted_gpus`: the GPUs Ray gave this process (`ray.get_gpu_ids()`), named in the error."""
    if not torch.cuda.is_available():
        problem = f"CUDA does not work here ({_cuda_init_error()})"
    else:
        capability = torch.cuda.get_device_capability()
        if arch_supported(capability, torch.cuda.get_arch_list()):
            return
        problem = f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}"
    given = f"Ray gave this process GPU {list(granted_gpus)}" if granted_gpus else "this process sees a GPU"
    raise GpuUnusableError(f"{given}, but {problem}. {_gpu_facts()}. "
                           f"{cuda_requirements()}; see infra/README.md (GPU nodes). Not falling back "
                           "to the CPU.")


def inference_device(granted_gpus: Sequence[object] = ()) -> torch.device:
    """The device a process runs its networks on: CUDA if Ray gave it a GPU (`granted_gpus`,
    `ray.get_gpu_ids()`) or CUDA works here, else the CPU. A GPU that the installed torch cannot
    use is a GpuUnusableError (`check_cuda`), never a silent fall back to the CPU."""
    if not granted_gpus and not torch.cuda.is_available():
        return torch.device("cpu")
    check_cuda(granted_gpus)
    return torch.device("cuda")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 convolutions natively (faster than float32): CUDA compute
    capability 8.0+ (`torch.cuda.is_bf16_supported()` is also true where bf16 is emulated, slowly)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """The dtype to autocast network inference to on `device` (None: float32)."""
    return torch.bfloat16 if mixed_precision and native_bf16(device) else None
