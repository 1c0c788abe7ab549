"""The built-in synthetic corpus: RGB images, image-level tags and ground-truth masks.

It stands in for real photos on a laptop: a tiny CNN trained for a few epochs on a few hundred of
these images learns the tags, yet its CAMs are coarse and peak on a part of each object, so
AffinityNet and the random walk have real work to do (bench/README.md has the measurements).

What an image holds:

- **Background**: a low-frequency colour field of low saturation, a mid-frequency luminance
  mottle and fine pixel noise, plus 0..`max_distractors` untagged distractor blobs (grey/brown,
  mottled: a look no class has), drawn behind the objects and never in the mask.
- **Objects** ("birds"): 1..`max_objects` smooth random blobs (an ellipse whose radius is
  perturbed by harmonics 2-4, so some are non-convex), long axis `object_length` x the short
  image side, `object_aspect` thin, any rotation, possibly cut by the image border; later ones
  occlude earlier ones. Each has a **head**, the `part_fraction` of the blob nearest to one tip
  of its long axis, in the class's vivid colour (six hues 60 degrees apart), and a **body** in a
  coat: a mid-saturation colour (hue halfway between head hues) with a low-contrast two-tone
  texture (stripes, spots or diamond scales) written in the object's own frame.
- **Classes** are named after birds known by their head colour. Classes k and k + 3 (opposite
  head hues) wear the same coat (with `own_coat_probability`, else a random coat), so a body
  only tells which pair an object belongs to and the head is the one decisive part. A
  classifier's CAM therefore peaks on the head and under-scores the body, while the body is still
  one coherent region with a clear edge against the grey background, which pixel affinities and
  the CRF can follow. Lowering `own_coat_probability` makes bodies less informative and CAMs more
  partial.
- The image is softened by a [1, 2, 1] blur (edges a pixel wide, as in photos), then noise.

Masks: uint8 [H, W], 0 background, k = 1..C the k-th class of `CLASS_NAMES` on the whole
visible object (body + head); 255 is never used. Tags are the classes in the mask, in
`CLASS_NAMES` order. A layout is re-drawn until every object keeps at least
`min_visible_fraction` of the image area, `min_object_visible` of itself and `min_head_visible`
of its head after occlusion and cropping, so tags and masks always agree and every tagged object
shows its discriminative part.

Every sample is a function of (seed, index) only: numpy Generators seeded by (seed, index, 0) for
the image and (seed, index, 1) for the distractors, so that the distractor settings change
nothing else. Vectorised numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psa_ray.data.corpus import CorpusKind, Sample, write_corpus
from psa_ray.data.drawing import Blob, head_mask, jitter, mottle, random_blob, rgb, smooth_field

__all__ = ["CLASS_NAMES", "Sample", "SyntheticConfig", "make_sample", "write_corpus"]

CLASS_NAMES: tuple[str, ...] = ("cardinal", "goldfinch", "mallard", "kingfisher", "bluejay", "flamingo")


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and look of the corpus. Fractions of the image are of its area, lengths of its short side."""

    num_images: int = 600
    seed: int = 0
    min_size: int = 96                                  # height and width each uniform in [min, max]
    max_size: int = 160
    max_objects: int = 3                                # 1..max_objects tagged objects per image
    max_distractors: int = 4                            # 0..max_distractors untagged blobs
    object_length: tuple[float, float] = (0.45, 0.85)   # long axis / short image side
    object_aspect: tuple[float, float] = (0.35, 0.65)   # short axis / long axis
    part_fraction: tuple[float, float] = (0.2, 0.3)     # head area / object area
    distractor_length: tuple[float, float] = (0.2, 0.5)
    own_coat_probability: float = 1.0                   # class k wears coat k % 3, else a random coat
    min_visible_fraction: float = 0.015                 # visible object area / image area
    min_head_visible: float = 0.5                       # visible head area / drawn head area
    min_object_visible: float = 0.6                     # visible object area / drawn object area
    noise_std: float = 5.0                              # per-pixel noise, grey levels
    max_layout_attempts: int = 100                      # re-drawn layouts before giving up

    @property
    def kind(self) -> CorpusKind:
        """How this corpus is drawn: `BIRDS`."""
        return BIRDS


@dataclass(frozen=True)
class _Coat:
    """A body look: HSV base and mark colours, a two-tone texture and its period in pixels."""

    base: tuple[float, float, float]
    mark: tuple[float, float, float]
    texture: str          # "stripes" | "spots" | "scales"
    period: float


# Body coats: mid saturation and value, hues halfway between head hues, low-contrast marks, so
# that a body is one coherent region that differs from the (grey) background and from every
# (vivid) head.
_COATS = (
    _Coat(base=(0.083, 0.65, 0.62), mark=(0.083, 0.70, 0.38), texture="stripes", period=8.0),
    _Coat(base=(0.417, 0.60, 0.52), mark=(0.417, 0.65, 0.32), texture="spots", period=9.0),
    _Coat(base=(0.750, 0.45, 0.62), mark=(0.750, 0.50, 0.38), texture="scales", period=7.0),
)
# Head colours (HSV) in CLASS_NAMES order: vivid, 60 degrees of hue apart. Classes k and k + 3
# (opposite hues) share coat k by default.
_HEADS = (
    (0.000, 0.90, 0.95),   # cardinal: red
    (0.167, 0.90, 0.98),   # goldfinch: yellow
    (0.333, 0.85, 0.85),   # mallard: green
    (0.500, 0.85, 0.90),   # kingfisher: cyan
    (0.667, 0.80, 0.95),   # bluejay: blue
    (0.833, 0.80, 0.90),   # flamingo: magenta
)


def _coat_colours(rng: np.random.Generator, coat: _Coat, blob: Blob) -> np.ndarray:
    """[H,W,3] body colours: the coat's two-tone texture in the object frame, with soft lighting."""
    u, v, p = blob.u, blob.v, coat.period * rng.uniform(0.85, 1.15)
    if coat.texture == "stripes":   # across the long axis, slightly wavy
        wave = 0.25 * p * np.sin(2 * np.pi * v / (3.0 * p) + rng.uniform(0, 2 * np.pi))
        marks = np.sin(2 * np.pi * (u + wave) / p + rng.uniform(0, 2 * np.pi)) > 0.1
    elif coat.texture == "spots":   # offset rows of round spots
        row = np.floor(v / p)
        su = u + 0.5 * p * (row % 2) + rng.uniform(0, p)
        marks = np.hypot((su % p) - p / 2, (v % p) - p / 2) < 0.3 * p
    else:                           # diamond scales: a checker rotated by 45 degrees
        d1, d2 = (u + v) / (p * np.sqrt(2)), (u - v) / (p * np.sqrt(2))
        marks = (np.floor(d1) + np.floor(d2)) % 2 == 0
    colours = np.where(marks[..., None], jitter(rng, coat.mark), jitter(rng, coat.base))
    light_angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + 0.12 * (u * np.cos(light_angle) + v * np.sin(light_angle)) / blob.half_length
    lit: np.ndarray = colours * light[..., None]
    return lit


def _background(rng: np.random.Generator, height: int, width: int, config: SyntheticConfig) -> np.ndarray:
    """[H,W,3] float: a low-frequency, low-saturation colour field with a luminance mottle (no
    setting of config changes it)."""
    gh, gw = rng.integers(2, 5, 2)
    hue = rng.uniform(0, 1)
    grid = np.array([[rgb((hue + rng.uniform(-0.12, 0.12), rng.uniform(0.03, 0.2), rng.uniform(0.3, 0.8)))
                      for _ in range(gw)] for _ in range(gh)])
    field = smooth_field(grid, height, width)
    return field * (1.0 + 0.25 * mottle(rng, height, width, rng.uniform(6, 14)))[..., None]


def _paint_distractors(rng: np.random.Generator, canvas: np.ndarray, yy: np.ndarray, xx: np.ndarray,
                       config: SyntheticConfig) -> None:
    """Draw 0..max_distractors untagged grey/brown mottled blobs onto canvas [H,W,3] in place."""
    height, width = canvas.shape[:2]
    short = min(height, width)
    for _ in range(rng.integers(0, config.max_distractors + 1)):
        blob = random_blob(rng, yy, xx, rng.uniform(*config.distractor_length) * short, rng.uniform(0.3, 1.0),
                           (rng.uniform(0, height), rng.uniform(0, width)))
        colour = rgb((rng.uniform(0.02, 0.12), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.75)))
        shade = 1.0 + 0.6 * mottle(rng, height, width, rng.uniform(2.5, 5))
        canvas[blob.inside] = colour * shade[blob.inside, None]


def _layout(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, canvas: np.ndarray, max_objects: int,
            config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """Draw 1..max_objects objects: (colours [H,W,3] where mask > 0, mask [H,W] uint8, acceptable).
    Their colours do not depend on the canvas beneath."""
    height, width = yy.shape
    short, area = min(height, width), height * width
    mask = np.zeros((height, width), np.uint8)
    colours = np.zeros((height, width, 3))
    owner = np.full((height, width), -1)
    heads, drawn_areas = [], []
    for index in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(len(CLASS_NAMES)))
        length = rng.uniform(*config.object_length) * short
        blob = random_blob(rng, yy, xx, length, rng.uniform(*config.object_aspect),
                           (rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width))
        if not blob.inside.any():
            return colours, mask, False
        head = head_mask(rng, blob, rng.uniform(*config.part_fraction))
        own_coat = rng.uniform() < config.own_coat_probability
        coat = _COATS[label % len(_COATS)] if own_coat else _COATS[rng.integers(len(_COATS))]
        body = _coat_colours(rng, coat, blob)
        colours[blob.inside] = np.where(head[..., None], jitter(rng, _HEADS[label]), body)[blob.inside]
        mask[blob.inside] = label + 1
        owner[blob.inside] = index
        drawn_areas.append(blob.inside.sum())
        heads.append(head)
    acceptable = all(
        (owner == i).sum() >= max(config.min_visible_fraction * area, config.min_object_visible * drawn)
        and (owner[head] == i).sum() >= config.min_head_visible * head.sum()
        for i, (head, drawn) in enumerate(zip(heads, drawn_areas, strict=True)))
    return colours, mask, acceptable


BIRDS = CorpusKind(class_names=CLASS_NAMES, id_prefix="syn", background=_background,
                   paint_distractors=_paint_distractors, layout=_layout)


def make_sample(index: int, config: SyntheticConfig) -> Sample:
    """The index-th image of the corpus given by config.seed (deterministic)."""
    return BIRDS.make_sample(index, config)
