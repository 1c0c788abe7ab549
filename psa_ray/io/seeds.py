"""Stage-B seed files: `seeds/<image_id>.png` holds either a hard seed label map or psa's CRF scores.

- A label map: an 8-bit palette PNG (`palette.encode_label_png`), values 0 (background), 1..C,
  255 (don't care). Decoded as [H,W] uint8.
- Seed scores (`CamConfig.seed_scores`, the paper preset): the dense-CRF marginals at alpha_low
  and alpha_high, background first, then the image's tagged classes, as jiwoon-ahn/psa saves them
  (`infer_cls.py`, `la_crf`/`ha_crf`), quantised to uint8 (round(255 * p)). They are stored as one
  8-bit grey PNG of the 2 (n+1) maps stacked top to bottom (low maps, then high maps), with a
  `psa_ray-seed-scores` text chunk holding `n+1` and `psa_ray-seed-classes` the label values
  (1..C) of maps 1..n, comma-separated. Decoded as [2, n+1, H, W] uint8. A real pixel's
  maps sum to about 255 and are never all zero, so zeros left by crop padding stay recognisable.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from psa_ray.io.images import ImageDecodeError
from psa_ray.io.palette import decode_label_png, open_png

SCORES_KEY = "psa_ray-seed-scores"
CLASSES_KEY = "psa_ray-seed-classes"


def quantize_scores(scores: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (any shape) -> uint8 round(255 * p)."""
    quantized: np.ndarray = np.rint(np.clip(np.asarray(scores, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return quantized


def encode_seed_scores(low: np.ndarray, high: np.ndarray, class_ids: np.ndarray) -> bytes:
    """CRF scores low, high [n+1,H,W] in [0, 1] (background, then the classes `class_ids` [n]) ->
    seed PNG bytes."""
    low, high, class_ids = np.asarray(low), np.asarray(high), np.asarray(class_ids).ravel()
    if low.ndim != 3 or low.shape != high.shape or low.shape[0] != len(class_ids) + 1:
        raise ValueError(f"expected two [n+1,H,W] score arrays of one shape for {len(class_ids)} classes, "
                         f"got {low.shape} and {high.shape}")
    channels, height, width = low.shape
    stacked = quantize_scores(np.concatenate([low, high])).reshape(2 * channels * height, width)
    info = PngImagePlugin.PngInfo()
    info.add_text(SCORES_KEY, str(channels))
    info.add_text(CLASSES_KEY, ",".join(str(int(k)) for k in class_ids))
    out = io.BytesIO()
    Image.fromarray(stacked, mode="L").save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def decode_seed(data: bytes) -> np.ndarray:
    """Seed PNG bytes -> a label map [H,W] uint8, or seed scores [2,n+1,H,W] uint8."""
    image = open_png(data, "seed")
    channels = image.info.get(SCORES_KEY)
    if channels is None:
        return decode_label_png(image)
    if image.mode != "L" or not str(channels).isdigit() or int(channels) < 1 \
            or image.height % (2 * int(channels)):
        raise ImageDecodeError(f"bad seed-score PNG: mode {image.mode}, {image.height} rows, "
                               f"{SCORES_KEY}={channels!r}")
    channels = int(channels)
    stacked = np.asarray(image, dtype=np.uint8)
    return stacked.reshape(2, channels, image.height // (2 * channels), image.width)
