"""Networks of the method (CAM net, AffinityNet, DeepLab) on stride-8 backbones, and weight loading."""
from __future__ import annotations

from psa_ray.models.backbones import BACKBONES, build_backbone
from psa_ray.models.networks import (
    NETWORKS, AffinityNet, CamNet, DeepLab, DeepLabLargeFOV, build_model, build_network, network_spec)
from psa_ray.models.weights import LoadReport, WeightsError, load_state, load_weights

__all__ = ["BACKBONES", "build_backbone", "AffinityNet", "CamNet", "DeepLab", "DeepLabLargeFOV",
           "NETWORKS", "build_model", "build_network", "network_spec",
           "LoadReport", "WeightsError", "load_state", "load_weights"]
