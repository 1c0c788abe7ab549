"""Pictures of label maps for people: palette overlays and titled panel grids with a colour legend.

Plain numpy/Pillow functions (no Ray, no matplotlib, no fonts to download: Pillow's built-in
default font). Label maps are [H,W] uint8 (0 background, 1..C classes, 255 ignore) and are
coloured with the VOC palette (`psa_ray.io.palette.colorize`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from psa_ray.io.palette import IGNORE, colorize

PAD = 6                      # pixels around and between panels and legend entries
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)

LegendEntry = tuple[str, tuple[int, int, int]]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont  # what ImageFont.load_default() returns


def overlay(rgb: np.ndarray, label: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """rgb [H,W,3] uint8, label [H,W] uint8 -> [H,W,3] uint8: the palette colour of each
    non-background pixel blended over the image with `opacity`; background pixels keep the image."""
    if rgb.shape[:2] != label.shape:
        raise ValueError(f"image {rgb.shape[:2]} and label {label.shape} differ in size")
    blended = (1.0 - opacity) * rgb.astype(np.float32) + opacity * colorize(label).astype(np.float32)
    out = np.where((label != 0)[..., None], np.rint(blended), rgb)
    return out.astype(np.uint8)


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """[H,W] or [H,W,3] -> [factor*H, factor*W(,3)] by pixel repetition (labels stay labels)."""
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def legend_entries(labels: Sequence[np.ndarray], class_names: Sequence[str]) -> list[LegendEntry]:
    """(name, palette colour) of every value present in any of the label maps, in value order:
    0 "background", k class_names[k - 1], 255 "ignore", anything else "label k"."""
    values = sorted(set().union(*(np.unique(label).tolist() for label in labels))) if labels else []
    entries = []
    for value in values:
        if value == 0:
            name = "background"
        elif value == IGNORE:
            name = "ignore"
        elif value <= len(class_names):
            name = class_names[value - 1]
        else:
            name = f"label {value}"
        colour = colorize(np.array([[value]], np.uint8))[0, 0]
        entries.append((name, (int(colour[0]), int(colour[1]), int(colour[2]))))
    return entries


def panel_grid(panels: Sequence[np.ndarray], titles: Sequence[str],
               legend: Sequence[LegendEntry] = ()) -> np.ndarray:
    """Panels [H,W,3] uint8 (one size) side by side, each under its title, above a legend of
    colour swatches and names (wrapped to the grid's width) -> [H',W',3] uint8 on white.

    Each panel is copied unchanged into the grid, `PAD` pixels apart.
    """
    if not panels or len(panels) != len(titles):
        raise ValueError(f"need one title per panel, got {len(panels)} panels and {len(titles)} titles")
    height, width = panels[0].shape[:2]
    if any(p.shape != (height, width, 3) or p.dtype != np.uint8 for p in panels):
        raise ValueError("panels must all be [H,W,3] uint8 of one size, got "
                         + ", ".join(f"{p.dtype} {p.shape}" for p in panels))
    font = ImageFont.load_default()
    line = _text_height(font)
    grid_width = PAD + len(panels) * (width + PAD)
    rows = _legend_rows(legend, font, line, grid_width)
    panels_top = PAD + line + PAD // 2
    legend_top = panels_top + height + PAD
    grid_height = legend_top + len(rows) * (line + PAD)
    canvas = Image.new("RGB", (grid_width, grid_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        left = PAD + i * (width + PAD)
        draw.text((left, PAD), _fit(title, font, width), fill=TEXT, font=font)
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (left, panels_top))
    for r, row in enumerate(rows):
        top = legend_top + r * (line + PAD)
        for left, name, colour in row:
            draw.rectangle((left, top, left + line - 1, top + line - 1), fill=colour, outline=TEXT)
            draw.text((left + line + PAD // 2, top), name, fill=TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _text_height(font: Font) -> int:
    box = font.getbbox("Ag|")
    return int(box[3]) + 2


def _text_width(text: str, font: Font) -> int:
    return int(font.getbbox(text)[2]) if text else 0


def _fit(text: str, font: Font, width: int) -> str:
    """text, cut and ended with '..' when wider than width pixels."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "..", font) > width:
        text = text[:-1]
    return text + ".."


def _legend_rows(legend: Sequence[LegendEntry], font: Font, line: int,
                 grid_width: int) -> list[list[tuple[int, str, tuple[int, int, int]]]]:
    """Legend entries placed as (left, name, colour), wrapped into rows that fit grid_width."""
    rows: list[list[tuple[int, str, tuple[int, int, int]]]] = []
    left = PAD
    for name, colour in legend:
        entry_width = line + PAD // 2 + _text_width(name, font)
        if not rows or (left > PAD and left + entry_width > grid_width - PAD):
            rows.append([])
            left = PAD
        rows[-1].append((left, name, colour))
        left += entry_width + 2 * PAD
    return rows
