"""Drawing helpers shared by the built-in corpora: colours, smooth noise fields, random blobs in
their own frame, the part of a blob nearest to one tip, and the [1, 2, 1] blur. Vectorised numpy."""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np


@dataclass
class Blob:
    """A rasterised blob: inside mask [H,W] bool, object-frame coordinates u (long axis), v [H,W]."""

    inside: np.ndarray
    u: np.ndarray
    v: np.ndarray
    half_length: float


def rgb(hsv: tuple[float, float, float]) -> np.ndarray:
    """HSV in [0,1] (hue wraps) -> RGB float [3] in 0..255."""
    h, s, v = hsv
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


def jitter(rng: np.random.Generator, hsv: tuple[float, float, float]) -> np.ndarray:
    """An object's own shade of a class colour: hue +-0.02, saturation and value x[0.85, 1.1]."""
    h, s, v = hsv
    return rgb((h + rng.uniform(-0.02, 0.02), s * rng.uniform(0.85, 1.1), v * rng.uniform(0.85, 1.1)))


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] bilinear (pixel-centre aligned) resampling weights."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    frac = pos - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def smooth_field(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """grid [gh,gw,c] -> [height,width,c], bilinearly upsampled."""
    rows, cols = _interpolation_matrix(height, grid.shape[0]), _interpolation_matrix(width, grid.shape[1])
    field: np.ndarray = (rows @ grid.transpose(2, 0, 1) @ cols.T).transpose(1, 2, 0)
    return field


def mottle(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """[height,width] smooth zero-mean noise with features about `cell` pixels wide, std < 0.5."""
    grid = rng.normal(0.0, 0.5, (int(height / cell) + 2, int(width / cell) + 2, 1))
    return smooth_field(grid, height, width)[..., 0]


def random_blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, length: float, aspect: float,
                centre: tuple[float, float], wobble: float = 0.13, exponent: float = 2.0) -> Blob:
    """A random smooth blob on the pixel grid yy, xx [H,W]: long axis `length`, short/long `aspect`.

    Its outline is a superellipse of `exponent` (2: an ellipse, 4: a rounded rectangle) whose
    radius is perturbed by harmonics 2-4 of amplitude each up to `wobble`."""
    a, b = length / 2.0, length * aspect / 2.0
    angle = rng.uniform(0.0, np.pi)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v / b, u / a)
    rho = (np.hypot(u / a, v / b) if exponent == 2.0
           else (np.abs(u / a) ** exponent + np.abs(v / b) ** exponent) ** (1.0 / exponent))
    harmonics = np.arange(2, 5)
    amplitude = rng.uniform(0.0, wobble, harmonics.size)
    phase = rng.uniform(0.0, 2 * np.pi, harmonics.size)
    radius = 1.0 + np.tensordot(amplitude, np.cos(harmonics[:, None, None] * theta + phase[:, None, None]),
                                axes=1)
    return Blob(inside=rho <= radius, u=u, v=v, half_length=a)


def head_mask(rng: np.random.Generator, blob: Blob, fraction: float) -> np.ndarray:
    """[H,W] bool: the blob's pixels nearest to one tip of its long axis, `fraction` of them."""
    side = rng.choice([-1.0, 1.0])
    tip = (side * blob.u[blob.inside]).max() * side
    distance = np.hypot(blob.u - tip, blob.v)
    head: np.ndarray = blob.inside & (distance <= np.quantile(distance[blob.inside], fraction))
    return head


def blur(image: np.ndarray) -> np.ndarray:
    """[H,W,3] separable [1,2,1]/4 blur with edge padding."""
    padded = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
    image = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    padded = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
    blurred: np.ndarray = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    return blurred
