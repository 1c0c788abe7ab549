"""Label maps as 8-bit palette PNGs with the PASCAL VOC colour map (0 background, 255 ignore)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from psa_ray.io.images import ImageDecodeError


def _voc_palette() -> list[int]:
    """The VOC devkit colour map: bit b of the index goes to bit 7 - b // 3 of channel b % 3."""
    palette: list[int] = []
    for index in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            if index >> bit & 1:
                rgb[bit % 3] |= 1 << (7 - bit // 3)
        palette.extend(rgb)
    return palette


IGNORE = 255  # the label of pixels that no loss or score counts (VOC's object borders, padding)
VOC_PALETTE: list[int] = _voc_palette()  # 768 ints: r0, g0, b0, r1, ...; index 255 = (224, 224, 192)
_PALETTE_RGB = np.asarray(VOC_PALETTE, dtype=np.uint8).reshape(256, 3)


def encode_label_png(label: np.ndarray) -> bytes:
    """[H,W] uint8 label map -> palette ('P') PNG bytes with VOC_PALETTE."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"expected a [H,W] uint8 label map, got {label.dtype} {label.shape}")
    height, width = label.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(label).tobytes())
    image.putpalette(VOC_PALETTE)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def open_png(data: bytes, what: str = "label") -> Image.Image:
    """PNG bytes, loaded; ImageDecodeError (naming `what`) if they are not a readable PNG."""
    try:
        image = Image.open(io.BytesIO(data), formats=("PNG",))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"unreadable {what} PNG: {type(e).__name__}: {e}") from e
    return image


def decode_label_png(data: bytes | Image.Image) -> np.ndarray:
    """Palette ('P', read by index) or 8-bit grey ('L') PNG bytes (or an opened PNG) -> [H,W]
    uint8 label map."""
    image = data if isinstance(data, Image.Image) else open_png(data)
    if image.mode not in ("P", "L"):
        raise ImageDecodeError(f"label PNG must be 8-bit palette or grey, got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """[H,W] uint8 label map -> [H,W,3] uint8 RGB in the VOC colours."""
    rgb: np.ndarray = _PALETTE_RGB[label]
    return rgb
