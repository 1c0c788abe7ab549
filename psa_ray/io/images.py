"""Decode untrusted image bytes to RGB uint8 arrays, and encode RGB arrays as PNG."""
from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Formats Pillow may try (those this Pillow build has). Others (EPS runs Ghostscript, PSD, ...)
# are refused on purpose. Multi-picture JPEGs (MPO) open as JPEG.
Image.init()
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "AVIF", "BMP", "GIF", "TIFF", "PPM") if f in Image.OPEN)
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 9459 x 9459)
MIN_SIDE = 32
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# File signatures, to tell a damaged image from a file that is no image at all.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


class ImageDecodeError(ValueError):
    """Bytes that do not decode to a usable image; the message is a short human reason."""


class DecodedImage(NamedTuple):
    """An upright RGB image, possibly shrunk, and the upright size of the stored image."""

    rgb: np.ndarray  # [h,w,3] uint8
    height: int      # H >= h
    width: int       # W >= w


def _rgb_image(image: Image.Image) -> Image.Image:
    """The image in mode RGB. Alpha is dropped (the stored colour is kept, not composited);
    16-bit grey (and 32-bit 'I', read as 16-bit) is scaled by 255/65535 with rounding."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"unsupported colour mode {image.mode}") from e


def _reason(error: Exception, otherwise: str) -> str:
    """A short reason for a Pillow error: truncation, else `otherwise`."""
    return "truncated image" if "truncated" in str(error).lower() else otherwise


def processing_size(height: int, width: int, max_side: int | None,
                    min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(h, w) to process an H x W image at: shrunk, aspect kept, so that the long side is at most
    max_side, but never so far that the short side drops below min_side. None: (H, W)."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max(max_side / max(height, width), min(1.0, min_side / min(height, width)))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_scaled(data: bytes, *, max_side: int | None, max_pixels: int = MAX_PIXELS,
                  min_side: int = MIN_SIDE) -> DecodedImage:
    """Image bytes -> upright RGB at `processing_size` (area-filtered), with the full upright size.

    Raises ImageDecodeError for empty, non-image, truncated or corrupt data, images with more
    than max_pixels pixels (checked from the header, before decoding: decompression bombs), and
    images with a side shorter than min_side pixels. Large JPEGs are decoded at a reduced DCT
    scale (1/2, 1/4, 1/8) when that still leaves at least the processing size.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # sizes above max_pixels are refused below, with a reason
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as e:
        claimed = next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)
        if claimed:
            raise ImageDecodeError(f"corrupt {claimed} header (starts like a {claimed}, does not parse)") from e
        raise ImageDecodeError("not an image (unrecognised or unsupported format)") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large (decompression bomb): {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"{_reason(e, 'corrupt image header')}: {e}") from e
    stored_width, stored_height = image.size
    if stored_width * stored_height > max_pixels:
        raise ImageDecodeError(f"image too large: {stored_width}x{stored_height} = "
                               f"{stored_width * stored_height} pixels > max_pixels {max_pixels}")
    if min(stored_width, stored_height) < min_side:
        raise ImageDecodeError(f"image too small: {stored_width}x{stored_height} "
                               f"(minimum side {min_side} px)")
    try:
        transposed = image.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING_ORIENTATIONS
        height, width = (stored_width, stored_height) if transposed else (stored_height, stored_width)
        target_height, target_width = processing_size(height, width, max_side, min_side)
        if (target_height, target_width) != (height, width):
            stored_target = (target_height, target_width) if transposed else (target_width, target_height)
            image.draft(None, stored_target)  # JPEG only; a no-op for other formats
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        rgb = _rgb_image(image)
        if rgb.size != (target_width, target_height):
            rgb = rgb.resize((target_width, target_height), Image.Resampling.BOX)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, SyntaxError, struct.error, ...)
        reason = _reason(e, f"corrupt {image.format} data")
        raise ImageDecodeError(f"{reason}: {type(e).__name__}: {e}") from e
    return DecodedImage(np.asarray(rgb, dtype=np.uint8), height, width)


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Image bytes -> [H,W,3] uint8 RGB at full size, upright per its EXIF orientation.

    Errors as in `decode_scaled`.
    """
    return decode_scaled(data, max_side=None, max_pixels=max_pixels, min_side=min_side).rgb


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h,w] uint8 label map -> [height,width] by nearest neighbour (values are never mixed)."""
    if label.shape == (height, width):
        return label
    return np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))


def encode_png(array: np.ndarray) -> bytes:
    """[H,W,3] uint8 RGB -> PNG bytes."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a [H,W,3] uint8 array, got {array.dtype} {array.shape}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="PNG")
    return out.getvalue()
