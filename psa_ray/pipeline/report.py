"""The label report a user looks at: one picture per sample and an index with the metrics.

`<output>/report/<image_id>.png`: image | CAM | random walk | final label | ground truth, each
titled, with a legend of the classes present. CAM and walk are recomputed here, in this process,
with the same library functions and networks as the pipeline's actors (it is a few images);
the final label is the one the pipeline wrote to `<output>/labels/`.
`<output>/report/index.md`: the IoU table (when ground truth was known) and the list of pictures.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from psa_ray.config import Preset
from psa_ray.io.images import decode_image, encode_png
from psa_ray.io.palette import colorize, decode_label_png
from psa_ray.io.storage import exists, join, read_bytes, write_bytes
from psa_ray.io.redact import redact
from psa_ray.ops.cam import with_background
from psa_ray.ops.pseudo_labels import scores_to_labels, tagged_cams, upsample_scores, walk_scores
from psa_ray.ops.visualize import legend_entries, overlay, panel_grid, upscale
from psa_ray.pipeline.actors import ground_truth
from psa_ray.pipeline.quality import statistics_table
from psa_ray.pipeline.scoring import metrics_table
from psa_ray.models.inference import autocast_dtype, inference_device, load_trained, to_tensor

DISPLAY_SIDE = 320  # smaller images are enlarged by an integer factor towards this long side


def tag_names(tags: np.ndarray, class_names: list[str]) -> list[str]:
    """Names of the classes set in a multi-hot tag vector [C]."""
    return [class_names[k] for k in np.flatnonzero(np.asarray(tags) > 0)]


def sample_panels(rgb: np.ndarray, tags: np.ndarray, final: np.ndarray, gt: np.ndarray | None,
                  cam_net: torch.nn.Module, affinity_net: torch.nn.Module, preset: Preset,
                  class_names: list[str]) -> np.ndarray:
    """One sample's picture [H',W',3] uint8 from its image [H,W,3], tags [C] multi-hot, final
    label [H,W] and optional ground truth [H,W]."""
    height, width = rgb.shape[:2]
    device = next(cam_net.parameters()).device
    image = to_tensor(rgb).to(device)
    autocast = autocast_dtype(device, preset.pipeline.mixed_precision)
    with torch.inference_mode():
        [(class_ids, cams)] = tagged_cams(cam_net, [image], [tags], preset.cam, autocast)
        cam_scores = with_background(cams[None], preset.walk.alpha)[0].cpu().numpy()
        walked = walk_scores(affinity_net, [image], [cams], preset.walk, autocast)[0].cpu().numpy()
    cam_label = scores_to_labels(cam_scores, class_ids)
    walk_label = scores_to_labels(upsample_scores(walked, height, width, preset.walk), class_ids)
    labels = [cam_label, walk_label, final] + ([gt] if gt is not None else [])
    panels = [rgb, overlay(rgb, cam_label), overlay(rgb, walk_label), colorize(final)]
    titles = [f"image: {', '.join(tag_names(tags, class_names))}", f"CAM (alpha {preset.walk.alpha:g})",
              "random walk", "final label"]
    if gt is not None:
        panels.append(colorize(gt))
        titles.append("ground truth")
    factor = max(1, DISPLAY_SIDE // max(height, width))
    return panel_grid([upscale(p, factor) for p in panels], titles, legend_entries(labels, class_names))


def write_report(output: str, rows: list[dict[str, Any]], preset: Preset, cam_weights: str,
                 affinity_weights: str, class_names: list[str], metrics: dict[str, Any] | None,
                 statistics: dict[str, Any] | None = None, warnings: Sequence[str] = (),
                 num_samples: int = 8) -> list[str]:
    """Pictures of the first `num_samples` of rows (a few) that have a label in `<output>/labels/`, and
    `<output>/report/index.md`; returns the URIs written (pictures, then the index).

    rows: `readers.corpus_rows` dicts (image_id, image, tags multi-hot, tag_names, gt_uri);
    statistics, warnings: `quality.label_statistics` and `quality.quality_warnings` of the run.
    A sample that cannot be drawn (unreadable image, sizes that differ) is listed in the index
    with the reason instead of failing the report.
    """
    folder = join(output, "report")
    labels = join(output, "labels")
    samples = [r for r in rows if exists(join(labels, f"{r['image_id']}.png"))][:num_samples]
    device = inference_device()
    cam_net = load_trained(cam_weights, device)
    affinity_net = load_trained(affinity_weights, device)

    written, lines, failed = [], [], []
    for row in samples:
        image_id = row["image_id"]
        try:
            rgb = decode_image(read_bytes(str(row["image"])))
            final = decode_label_png(read_bytes(join(labels, f"{image_id}.png")))
            gt = ground_truth(row.get("gt_uri", ""))
            for name, label in (("label", final), ("ground truth", gt)):
                if label is not None and label.shape != rgb.shape[:2]:
                    raise ValueError(f"{name} {label.shape} does not match image {rgb.shape[:2]}")
            picture = sample_panels(rgb, np.asarray(row["tags"]), final, gt, cam_net, affinity_net,
                                    preset, class_names)
        except Exception as e:  # noqa: BLE001 - one bad sample must not lose the others
            failed.append(f"- `{image_id}`: {redact(f'{type(e).__name__}: {e}')[:300]}")
            continue
        uri = join(folder, f"{image_id}.png")
        write_bytes(uri, encode_png(picture))
        written.append(uri)
        names = ", ".join(tag_names(np.asarray(row["tags"]), class_names))
        lines.append(f"- `{image_id}` ({names}): ![{image_id}]({image_id}.png)")

    index = ["# psa_ray label report", "",
             f"Preset `{preset.name}`, CAM weights `{cam_weights}`,",
             f"AffinityNet weights `{affinity_weights}`.", ""]
    if warnings:
        index += ["## Warnings", "", *(f"- {w}" for w in warnings), ""]
    if statistics:
        index += [f"## Label statistics (no ground truth needed), {statistics['images']} images", "",
                  "```text", statistics_table(statistics), "```", ""]
    if metrics:
        index += [f"## IoU (%) against ground truth, {metrics.get('images', '?')} images", "",
                  "```text", metrics_table(metrics), "```", ""]
    index += ["## Samples", "",
              "Each picture: image (with its tags) | CAM of the tagged classes, argmax with background "
              f"(1 - max)^{preset.walk.alpha:g} | random walk (AffinityNet, beta {preset.walk.beta:g}, "
              f"t {preset.walk.t}), argmax | final label (labels/, after the CRF) | ground truth (if any).",
              "", *(lines or ["No labeled images."]), ""]
    if failed:
        index += ["## Samples that could not be drawn", "", *failed, ""]
    index_uri = join(folder, "index.md")
    write_bytes(index_uri, "\n".join(index).encode())
    return written + [index_uri]
