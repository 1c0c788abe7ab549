"""Dense CRF on a synthetic image: it snaps a blurred, shifted mask back to the object's edges."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from psa_ray.config import CrfConfig
from psa_ray.ops.crf import dense_crf

HEIGHT, WIDTH = 64, 80


def disc_scene() -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on a dark textured background: image [H,W,3] uint8 and true mask [H,W] bool."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    mask = (yy - 30) ** 2 + (xx - 42) ** 2 < 16**2
    image = rng.integers(0, 50, size=(HEIGHT, WIDTH, 3))
    image[mask] = rng.integers(190, 240, size=(int(mask.sum()), 3))
    return image.astype(np.uint8), mask


def blurred_shifted_probs(mask: np.ndarray) -> np.ndarray:
    """[2,H,W]: background / foreground probabilities from the mask moved by (5, -6) and blurred."""
    shifted = np.roll(mask, shift=(5, -6), axis=(0, 1)).astype(np.float32)
    blurred = F.avg_pool2d(torch.from_numpy(shifted)[None, None], 9, stride=1, padding=4,
                           count_include_pad=False)[0, 0].numpy()
    foreground = 0.15 + 0.7 * blurred
    return np.stack([1.0 - foreground, foreground])


def iou(prediction: np.ndarray, mask: np.ndarray) -> float:
    return float((prediction & mask).sum() / (prediction | mask).sum())


def test_crf_moves_labels_to_the_object() -> None:
    image, mask = disc_scene()
    probs = blurred_shifted_probs(mask)
    before = iou(probs.argmax(axis=0) == 1, mask)
    refined = dense_crf(image, probs)
    assert refined.shape == (2, HEIGHT, WIDTH) and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)
    assert refined.min() >= 0.0
    labels = refined.argmax(axis=0)
    assert set(np.unique(labels)) <= {0, 1}
    after = iou(labels == 1, mask)
    assert before < 0.75 and after > 0.9, (before, after)


def test_three_classes_and_unnormalised_scores() -> None:
    image, mask = disc_scene()
    probs = blurred_shifted_probs(mask)
    # background power scores as the pipeline passes them: not summing to 1, one class all zero.
    scores = np.stack([probs[0] ** 4, probs[1], np.zeros_like(probs[1])]).astype(np.float32)
    refined = dense_crf(image, scores, CrfConfig(iterations=5))
    assert refined.shape == (3, HEIGHT, WIDTH) and np.isfinite(refined).all()
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)
    labels = refined.argmax(axis=0)
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert not (labels == 2).any()


def test_rejects_mismatched_inputs() -> None:
    image, mask = disc_scene()
    probs = blurred_shifted_probs(mask)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="HxWx3"):
        dense_crf(image[..., :2].copy(), probs)
    with pytest.raises(ValueError, match="probs"):
        dense_crf(image, probs[:, :-1])
    with pytest.raises(ValueError, match="probs"):
        dense_crf(image, probs[0])
