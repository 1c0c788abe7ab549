"""Decode untrusted image bytes to RGB uint8 arrays, and encode RGB arrays as PNG."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats Pillow may try (those this Pillow build has). Others (EPS runs Ghostscript, PSD, ...)
# are refused on purpose. Multi-picture JPEGs (MPO) open as JPEG.
Image.init()
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "AVIF", "BMP", "GIF", "TIFF", "PPM") if f in Image.OPEN)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageDecodeError(ValueError):
    """Bytes that do not decode to a usable image; the message is a short human reason."""


def _to_rgb(image: Image.Image) -> np.ndarray:
    """[H,W,3] uint8. Alpha is dropped (the stored colour is kept, not composited); 16-bit
    grey (and 32-bit 'I', read as 16-bit) is scaled by 255/65535 with rounding."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as e:
            raise ImageDecodeError(f"unsupported colour mode {image.mode}") from e
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int = 89_478_485, min_side: int = 32) -> np.ndarray:
    """Image bytes -> [H,W,3] uint8 RGB, upright per its EXIF orientation.

    Raises ImageDecodeError for empty, non-image, truncated or corrupt data, images with more
    than max_pixels pixels (checked from the header, before decoding: decompression bombs), and
    images with a side shorter than min_side pixels.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not an image (unrecognised or unsupported format)") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large (decompression bomb): {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"corrupt image header: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"image too large: {width}x{height} = {width * height} pixels "
                               f"> max_pixels {max_pixels}")
    if min(width, height) < min_side:
        raise ImageDecodeError(f"image too small: {width}x{height} (minimum side {min_side} px)")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        reason = "truncated image" if "truncated" in str(e) else f"corrupt {image.format} data"
        raise ImageDecodeError(f"{reason}: {type(e).__name__}: {e}") from e


def encode_png(array: np.ndarray) -> bytes:
    """[H,W,3] uint8 RGB -> PNG bytes."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a [H,W,3] uint8 array, got {array.dtype} {array.shape}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="PNG")
    return out.getvalue()
