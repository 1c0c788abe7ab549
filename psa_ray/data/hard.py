"""The built-in "hard" corpus: classes told apart by texture and silhouette, not by hue.

A harder stand-in for real photos than the birds of `psa_ray.data.synthetic`: small objects,
several per image, on cluttered backgrounds. A tiny CNN still learns the tags in a few epochs
(the textures have periods of about 6-12 px, so classes differ at 1/8 resolution in aggregate).

What an image holds:

- **Background**: a natural (brown to green, low to mid saturation) colour field with luminance
  noise over four octaves (cells of 48 to 6 px), 1..`background_regions` soft-edged regions of
  another natural colour with a fine grain (terrain, foliage), and 0..`max_distractors` untagged
  distractor shapes with textures no class has: plain mottle, wood grain (thin wavy lines 12-18 px
  apart), speckle (pixel-sized dots) or a smooth shaded stone. Never in the mask.
- **Objects**: 1..`max_objects` of them (the same class may come twice), long axis
  `object_length` x the short image side x the class's length factor (small to medium), any
  rotation, possibly cut by the border; later ones occlude earlier ones. Each class has its own
  silhouette and a high-contrast two-tone texture in the object's frame (`_CLASSES`): zebra
  (elongated, wavy stripes), leopard (round blob, spots), giraffe (lumpy blob, dark patches in a
  light net), chessboard (rounded square, checks), bullseye (disc, concentric rings), python (long
  and thin, diamond scales).
- **Colours** come from eight two-tone palettes (`_PALETTES`), each shared by two to four classes,
  with light and dark swapped at random and jittered per object, so hue alone does not tell the
  class. Of a palette draw, the one whose plain colour differs most from the background beneath
  the object (first at least `min_contrast` apart) is kept: objects are not camouflaged.
- Each object's `plain_fraction` nearest to one tip of its long axis is **plain** (the base colour,
  untextured): it belongs to the object by colour and edge only, so a classifier's CAM peaks on the
  texture and under-scores the plain part, while pixel affinities and the CRF can follow the
  colour from texture to plain part up to the object's edge.
- The image is softened by a [1, 2, 1] blur (edges a pixel wide), then noise.

Masks: uint8 [H, W], 0 background, k = 1..6 the k-th class of `CLASS_NAMES` on the whole visible
object; 255 is never used. Tags are the classes in the mask, in `CLASS_NAMES` order. A layout is
re-drawn until every object keeps at least `min_visible_fraction` of the image area,
`min_object_visible` of itself and `min_texture_visible` of its textured part.

Every sample is a function of (seed, index) only: numpy Generators seeded by (seed, index, 0) for
the image and (seed, index, 1) for the distractors. Vectorised numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psa_ray.data.corpus import CorpusKind, Sample
from psa_ray.data.drawing import head_mask, jitter, mottle, random_blob, rgb, smooth_field

CLASS_NAMES: tuple[str, ...] = ("zebra", "leopard", "giraffe", "chessboard", "bullseye", "python")


@dataclass(frozen=True)
class HardConfig:
    """Size and look of the corpus. Fractions of the image are of its area, lengths of its short side."""

    num_images: int = 480
    seed: int = 0
    min_size: int = 96                                  # height and width each uniform in [min, max]
    max_size: int = 160
    max_objects: int = 4                                # 1..max_objects tagged objects per image
    max_distractors: int = 5                            # 0..max_distractors untagged textured shapes
    background_regions: int = 3                         # 1..background_regions soft-edged regions
    object_length: tuple[float, float] = (0.22, 0.5)    # long axis / short side, x the class's factor
    plain_fraction: tuple[float, float] = (0.2, 0.35)   # untextured part / object area
    distractor_length: tuple[float, float] = (0.15, 0.5)
    min_contrast: float = 70.0                          # RGB distance, plain colour to background
    min_visible_fraction: float = 0.008                 # visible object area / image area
    min_object_visible: float = 0.6                     # visible object area / drawn object area
    min_texture_visible: float = 0.5                    # visible textured area / drawn textured area
    noise_std: float = 6.0                              # per-pixel noise, grey levels
    max_layout_attempts: int = 100                      # re-drawn layouts before giving up

    @property
    def kind(self) -> CorpusKind:
        """How this corpus is drawn: `HARD`."""
        return HARD


@dataclass(frozen=True)
class _Class:
    """A class's look: texture, its period (px), silhouette and the palettes it draws from."""

    texture: str                          # a key of _TEXTURES
    period: float
    aspect: tuple[float, float]           # short axis / long axis
    length_factor: float                  # x HardConfig.object_length
    wobble: float                         # outline harmonics, see drawing.random_blob
    exponent: float                       # outline superellipse exponent
    palettes: tuple[int, ...]             # indices into _PALETTES


# Two-tone palettes (HSV light, HSV dark); each is used by two to four classes.
_PALETTES: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((0.10, 0.05, 0.95), (0.10, 0.10, 0.12)),   # white / black
    ((0.08, 0.85, 0.95), (0.05, 0.50, 0.15)),   # orange / black
    ((0.14, 0.80, 0.95), (0.07, 0.75, 0.35)),   # yellow / brown
    ((0.10, 0.30, 0.95), (0.03, 0.80, 0.45)),   # cream / chestnut
    ((0.58, 0.10, 0.97), (0.62, 0.80, 0.55)),   # white / blue
    ((0.12, 0.25, 0.95), (0.98, 0.85, 0.70)),   # cream / red
    ((0.17, 0.70, 0.95), (0.38, 0.80, 0.40)),   # yellow / green
    ((0.85, 0.50, 0.90), (0.00, 0.00, 0.30)),   # pink / grey
)
# In CLASS_NAMES order.
_CLASSES = (
    _Class("stripes", 8.0, (0.35, 0.5), 1.2, 0.10, 2.0, (0, 1, 2, 4)),
    _Class("spots", 9.0, (0.65, 0.9), 1.0, 0.13, 2.0, (1, 2, 3, 5)),
    _Class("net", 10.0, (0.5, 0.7), 1.1, 0.20, 2.0, (2, 3, 4, 6)),
    _Class("checks", 9.0, (0.7, 1.0), 0.9, 0.02, 4.0, (3, 4, 5, 7)),
    _Class("rings", 8.0, (0.9, 1.0), 0.85, 0.0, 2.0, (0, 4, 5, 6)),
    _Class("scales", 7.0, (0.2, 0.3), 1.5, 0.08, 2.0, (1, 5, 6, 7)),
)


def _stripes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """[H,W] bool: wavy bands across the long axis u, `p` px apart."""
    wave = 0.2 * p * np.sin(2 * np.pi * v / (4.0 * p) + rng.uniform(0, 2 * np.pi))
    return np.sin(2 * np.pi * (u + wave) / p + rng.uniform(0, 2 * np.pi)) > 0.0


def _cell_jitter(rng: np.random.Generator, cu: np.ndarray, cv: np.ndarray, spread: float) -> np.ndarray:
    """[H,W,2] a random offset in [-spread, spread] per grid cell (cu, cv) [H,W] int, from a 16x16 table."""
    table = rng.uniform(-spread, spread, (16, 16, 2))
    offsets: np.ndarray = table[cu % 16, cv % 16]
    return offsets


def _spots(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """[H,W] bool: round spots of radius ~0.33 p, one per p x p cell, jittered."""
    cu, cv = np.floor(u / p).astype(int), np.floor(v / p).astype(int)
    offset = _cell_jitter(rng, cu, cv, 0.12 * p)
    du, dv = u - (cu + 0.5) * p - offset[..., 0], v - (cv + 0.5) * p - offset[..., 1]
    spots: np.ndarray = np.hypot(du, dv) < 0.33 * p
    return spots


def _net(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """[H,W] bool: polygonal patches (Voronoi cells of jittered seeds p apart) inside a light net."""
    cu, cv = np.floor(u / p).astype(int), np.floor(v / p).astype(int)
    table = rng.uniform(0.15 * p, 0.85 * p, (16, 16, 2))
    distances = []
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            seed = table[(cu + du) % 16, (cv + dv) % 16]
            distances.append(np.hypot(u - (cu + du) * p - seed[..., 0], v - (cv + dv) * p - seed[..., 1]))
    nearest = np.sort(np.stack(distances), axis=0)
    edges: np.ndarray = nearest[1] - nearest[0] > 0.18 * p
    return edges


def _checks(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """[H,W] bool: a checkerboard of p/2 squares in the object frame."""
    shift = rng.uniform(0, p, 2)
    squares: np.ndarray = (np.floor((u + shift[0]) / (p / 2)) + np.floor((v + shift[1]) / (p / 2))) % 2 == 0
    return squares


def _rings(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """[H,W] bool: rings p apart, concentric with the object."""
    rings: np.ndarray = np.sin(2 * np.pi * np.hypot(u, v) / p + rng.uniform(0, 2 * np.pi)) > 0.0
    return rings


def _scales(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """[H,W] bool: snake scales, diamonds p wide (diagonally to the long axis) outlined by thin lines."""
    shift = rng.uniform(0, 1, 2)
    d1, d2 = (u + v) / (p * np.sqrt(2)) + shift[0], (u - v) / (p * np.sqrt(2)) + shift[1]
    lines: np.ndarray = (np.abs(d1 % 1.0 - 0.5) > 0.36) | (np.abs(d2 % 1.0 - 0.5) > 0.36)
    return lines


_TEXTURES = {"stripes": _stripes, "spots": _spots, "net": _net, "checks": _checks, "rings": _rings,
             "scales": _scales}


def _natural(rng: np.random.Generator) -> np.ndarray:
    """RGB [3] of a random natural colour: brown to green, low to mid saturation."""
    return rgb((rng.uniform(0.04, 0.36), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.75)))


def _background(rng: np.random.Generator, height: int, width: int, config: HardConfig) -> np.ndarray:
    """[H,W,3] float: a natural colour field with multi-octave noise and soft-edged grainy regions."""
    grid = np.array([[_natural(rng) for _ in range(4)] for _ in range(4)])
    canvas: np.ndarray = smooth_field(grid, height, width)
    octaves = np.sum([amplitude * mottle(rng, height, width, cell)
                      for amplitude, cell in ((0.4, 48.0), (0.3, 24.0), (0.2, 12.0), (0.15, 6.0))], axis=0)
    canvas = canvas * (1.0 + octaves)[..., None]
    for _ in range(rng.integers(1, config.background_regions + 1)):
        region = mottle(rng, height, width, rng.uniform(20, 45)) - rng.uniform(-0.2, 0.3)
        alpha = 1.0 / (1.0 + np.exp(-np.clip(region / 0.04, -50, 50)))
        grain = 1.0 + rng.uniform(0.15, 0.35) * mottle(rng, height, width, rng.uniform(2.5, 5))
        colour = _natural(rng) * grain[..., None]
        canvas = canvas * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    return canvas


def _paint_distractors(rng: np.random.Generator, canvas: np.ndarray, yy: np.ndarray, xx: np.ndarray,
                       config: HardConfig) -> None:
    """Draw 0..max_distractors untagged shapes with non-class textures onto canvas [H,W,3] in place."""
    height, width = canvas.shape[:2]
    short = min(height, width)
    for _ in range(rng.integers(0, config.max_distractors + 1)):
        kind = rng.integers(4)
        aspect = rng.uniform(0.15, 0.4) if kind == 1 else rng.uniform(0.3, 1.0)
        blob = random_blob(rng, yy, xx, rng.uniform(*config.distractor_length) * short, aspect,
                           (rng.uniform(0, height), rng.uniform(0, width)), wobble=0.2)
        colour = _natural(rng)
        shade: np.ndarray
        if kind == 0:    # plain mottle
            shade = 1.0 + 0.6 * mottle(rng, height, width, rng.uniform(2.5, 5))
        elif kind == 1:  # wood grain: thin wavy lines along the long axis
            p = rng.uniform(12, 18)
            wave = 0.3 * p * np.sin(2 * np.pi * blob.u / (2.5 * p) + rng.uniform(0, 2 * np.pi))
            shade = 1.0 - 0.5 * (np.sin(2 * np.pi * (blob.v + wave) / p) > 0.75)
        elif kind == 2:  # speckle: pixel-sized dots
            shade = 1.0 - 0.45 * (rng.uniform(size=(height, width)) < 0.3)
        else:            # stone: smooth shading
            shade = 0.75 + 0.5 * np.clip(0.5 + (blob.u + blob.v) / (3.0 * blob.half_length), 0.0, 1.0)
        canvas[blob.inside] = colour * shade[blob.inside, None]


def _object_colours(rng: np.random.Generator, look: _Class, plain: np.ndarray, marks: np.ndarray,
                    beneath: np.ndarray, min_contrast: float) -> np.ndarray:
    """[H,W,3] an object's colours: base on plain pixels [H,W] and off marks [H,W], mark colour on
    marks; of up to 8 palette draws the first whose base is min_contrast from RGB beneath [3],
    else the farthest."""
    best, best_distance = (np.zeros(3), np.zeros(3)), -1.0
    for _ in range(8):
        light, dark = _PALETTES[look.palettes[rng.integers(len(look.palettes))]]
        base, mark = (light, dark) if rng.uniform() < 0.5 else (dark, light)
        colours = jitter(rng, base), jitter(rng, mark)
        distance = float(np.linalg.norm(colours[0] - beneath))
        if distance > best_distance:
            best, best_distance = colours, distance
        if distance >= min_contrast:
            break
    return np.where((marks & ~plain)[..., None], best[1], best[0])


def _layout(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, canvas: np.ndarray, max_objects: int,
            config: HardConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """Draw 1..max_objects objects over canvas [H,W,3]: (colours [H,W,3] where mask > 0, mask
    [H,W] uint8, acceptable)."""
    height, width = yy.shape
    short, area = min(height, width), height * width
    mask = np.zeros((height, width), np.uint8)
    colours = np.zeros((height, width, 3))
    owner = np.full((height, width), -1)
    textured_parts, drawn_areas = [], []
    for index in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(len(CLASS_NAMES)))
        look = _CLASSES[label]
        blob = random_blob(rng, yy, xx, rng.uniform(*config.object_length) * look.length_factor * short,
                           rng.uniform(*look.aspect),
                           (rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width),
                           wobble=look.wobble, exponent=look.exponent)
        if not blob.inside.any():
            return colours, mask, False
        plain = head_mask(rng, blob, rng.uniform(*config.plain_fraction))
        marks = _TEXTURES[look.texture](rng, blob.u, blob.v, look.period * rng.uniform(0.85, 1.15))
        paint = _object_colours(rng, look, plain, marks, canvas[blob.inside].mean(axis=0), config.min_contrast)
        light_angle = rng.uniform(0, 2 * np.pi)
        light = 1.0 + 0.12 * (blob.u * np.cos(light_angle) + blob.v * np.sin(light_angle)) / blob.half_length
        colours[blob.inside] = (paint * light[..., None])[blob.inside]
        mask[blob.inside] = label + 1
        owner[blob.inside] = index
        drawn_areas.append(blob.inside.sum())
        textured_parts.append(blob.inside & ~plain)
    acceptable = all(
        (owner == i).sum() >= max(config.min_visible_fraction * area, config.min_object_visible * drawn)
        and (owner[textured] == i).sum() >= config.min_texture_visible * textured.sum()
        for i, (textured, drawn) in enumerate(zip(textured_parts, drawn_areas, strict=True)))
    return colours, mask, acceptable


HARD = CorpusKind(class_names=CLASS_NAMES, id_prefix="hard", background=_background,
                  paint_distractors=_paint_distractors, layout=_layout)


def make_sample(index: int, config: HardConfig) -> Sample:
    """The index-th image of the corpus given by config.seed (deterministic)."""
    return HARD.make_sample(index, config)
