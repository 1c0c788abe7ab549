"""Fully connected CRF (Kraehenbuehl & Koltun) refinement of per-pixel class scores."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from psa_ray.config import CrfConfig

DEFAULT_CRF = CrfConfig()


def dense_crf(image: np.ndarray, probs: np.ndarray, config: CrfConfig = DEFAULT_CRF) -> np.ndarray:
    """image [H,W,3] uint8 RGB, probs [C,H,W] (per-class scores in [0, 1]) -> marginals [C,H,W] float32.

    Unary -log(probs) (clipped at 1e-5 so it stays finite), a Gaussian smoothness kernel and a
    bilateral appearance kernel, mean-field inference for `config.iterations` steps.
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise ValueError(f"image must be an HxWx3 uint8 array, got "
                         f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image))}")
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] < 1 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be [C,H,W] with H, W = {image.shape[:2]}, got {probs.shape}")
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=config.gaussian_sxy, compat=config.gaussian_compat)
    crf.addPairwiseBilateral(sxy=config.bilateral_sxy, srgb=config.bilateral_srgb,
                             rgbim=np.require(image, requirements=["C", "W"]),  # it wants a writable buffer
                             compat=config.bilateral_compat)
    marginals = crf.inference(config.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(classes, height, width)

