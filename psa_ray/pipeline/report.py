"""The label report a user looks at: the run's quality figures and pictures, as a page.

`<output>/report/index.html` (and the same as `index.md`): warnings; per-class quality without
ground truth (the CAM network's held-out tag AP, seed and label statistics); the IoU table when
ground truth was known; "check these first", the pictures of the least trustworthy images (lowest
per-image quality score, `report/review.csv` lists more); and pictures of a few samples.
A picture (`report/<image_id>.png`) is image | CAM | random walk | final label | ground truth,
each titled, with a legend of the classes present. CAM and walk are recomputed for these few
images in one Ray task on a worker (a GPU one if the cluster has GPUs), never on the driver (the
head), with the same library functions and networks as the pipeline's actors, on the images
shrunk to the pipeline's `max_side`; the final label is the one the pipeline wrote to
`<output>/labels/`.
"""
from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from psa_ray.config import Preset
from psa_ray.io.images import decode_scaled, encode_png, resize_label
from psa_ray.io.palette import colorize, decode_label_png
from psa_ray.io.storage import exists, join, read_bytes, write_bytes
from psa_ray.io.redact import redact
from psa_ray.ops.pseudo_labels import refine_label, scores_to_labels, tagged_cams, walk_scores
from psa_ray.ops.visualize import legend_entries, overlay, panel_grid, upscale
from psa_ray.pipeline.actors import ground_truth
from psa_ray.pipeline.quality_rules import statistics_notes, statistics_rows
from psa_ray.pipeline.scoring import metrics_rows
from psa_ray.pipeline.tables import Table, html_table, text_table
from psa_ray.models.inference import autocast_dtype, load_trained, model_input
from psa_ray.train.loop import ray_device
from psa_ray.pipeline.layout import OutputLayout

DISPLAY_SIDE = 320  # smaller images are enlarged by an integer factor towards this long side


@dataclass
class Section:
    """One part of the report: a title, lines (list items), a table with notes under it, pictures
    (file name in report/, caption)."""

    title: str
    lines: list[str] = field(default_factory=list)
    table: Table | None = None
    notes: list[str] = field(default_factory=list)
    pictures: list[tuple[str, str]] = field(default_factory=list)


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
    autocast = autocast_dtype(device, preset.pipeline.mixed_precision)
    with torch.inference_mode():
        [(class_ids, cams)] = tagged_cams(cam_net, [model_input(rgb, cam_net)], [tags], preset.cam, autocast)
        walked = walk_scores(affinity_net, [model_input(rgb, affinity_net)], [cams], preset.walk,
                             autocast)[0].cpu().numpy()
    refined = refine_label(rgb, cams.float().cpu().numpy(), walked, class_ids, preset.walk, preset.cam.alpha_low)
    cam_label, walk_label = (scores_to_labels(scores, class_ids) for scores in (refined.cams, refined.walked))
    labels = [cam_label, walk_label, final] + ([gt] if gt is not None else [])
    panels = [rgb, overlay(rgb, cam_label), overlay(rgb, walk_label), colorize(final)]
    titles = [f"image: {', '.join(tag_names(tags, class_names))}", f"CAM (alpha {preset.walk.alpha:g})",
              "random walk", "final label"]
    if gt is not None:
        panels.append(colorize(gt))
        titles.append("ground truth")
    factor = max(1, DISPLAY_SIDE // max(height, width))
    return panel_grid([upscale(p, factor) for p in panels], titles, legend_entries(labels, class_names))


def quality_sections(summary: dict[str, Any], metrics: dict[str, Any] | None) -> list[Section]:
    """The run's figures (a `labeling.run` summary and its metrics.json): warnings, per-class
    quality without ground truth, IoU against ground truth. Printed by the job and in the report."""
    sections = []
    if summary.get("warnings"):
        sections.append(Section("Warnings", lines=list(summary["warnings"])))
    labels = summary.get("label_statistics")
    if labels:
        seeds, held_out = summary.get("seed_statistics"), summary.get("cam_held_out")
        sections.append(Section(f"Quality without ground truth, {labels['images']} images",
                                table=statistics_rows(labels, seeds, held_out),
                                notes=statistics_notes(labels, seeds, held_out)))
    if metrics:
        sections.append(Section(f"IoU (%) against ground truth, {metrics.get('images', '?')} images",
                                table=metrics_rows(metrics)))
    return sections


def text_report(sections: Sequence[Section]) -> str:
    """Sections as plain text (what the job prints)."""
    out = []
    for s in sections:
        out += ["", f"{s.title}:", *(f"- {line}" for line in s.lines)]
        if s.table:
            out.append(text_table(s.table))
        out += s.notes
        out += [f"- {caption}: {name}" for name, caption in s.pictures]
    return "\n".join(out)


def markdown_report(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    out = [f"# {title}", "", *intro, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        out += [f"- {line}" for line in s.lines] + ([""] if s.lines else [])
        if s.table:
            out += ["```text", text_table(s.table), "```", ""]
        out += [*s.notes, ""] if s.notes else []
        out += [f"- {caption}: ![{name}]({name})" for name, caption in s.pictures]
        out += [""] if s.pictures else []
    return "\n".join(out)


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:2px 8px}
td:not(:first-child){text-align:right}th{background:#eee}figure{margin:1em 0}
img{max-width:100%;image-rendering:pixelated}figcaption{font-size:90%;color:#333}
.warning{color:#a00}"""


def html_report(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    """Sections as one HTML page (pictures by relative file name, beside the page)."""
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>", *(f"<p>{e(p)}</p>" for p in intro)]
    for s in sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        if s.lines:
            css = " class='warning'" if s.title == "Warnings" else ""
            out.append(f"<ul{css}>" + "".join(f"<li>{e(line)}</li>" for line in s.lines) + "</ul>")
        if s.table:
            out.append(html_table(s.table))
        out += [f"<p>{e(note)}</p>" for note in s.notes]
        out += [f"<figure><img src='{e(name)}' alt='{e(name)}'><figcaption>{e(caption)}</figcaption></figure>"
                for name, caption in s.pictures]
    return "\n".join(out + ["</body></html>"])


def draw_pictures(rows: Sequence[dict[str, Any]], output: str, preset: Preset, cam_weights: str,
                  affinity_weights: str, class_names: list[str]) -> dict[str, str]:
    """The pictures of `rows` (`sample_panels`) written to `<output>/report/<image_id>.png`, each
    image shrunk to the pipeline's `max_side` (its labels with it); returns {image_id: reason} of
    those that could not be drawn (unreadable image, sizes that differ). Runs the networks: call
    it in a Ray task (`write_report`), not on the driver."""
    folder, labels = OutputLayout(output).report, OutputLayout(output).labels
    device = ray_device()
    cam_net = load_trained(cam_weights, device)
    affinity_net = load_trained(affinity_weights, device)
    failed = {}
    for row in rows:
        image_id = row["image_id"]
        try:
            image = decode_scaled(read_bytes(str(row["image"])), max_side=preset.pipeline.max_side)
            height, width = image.rgb.shape[:2]
            final = decode_label_png(read_bytes(join(labels, f"{image_id}.png")))
            gt = ground_truth(row.get("gt_uri", ""))
            for name, label in (("label", final), ("ground truth", gt)):
                if label is not None and label.shape != (image.height, image.width):
                    raise ValueError(f"{name} {label.shape} does not match image {(image.height, image.width)}")
            picture = sample_panels(image.rgb, np.asarray(row["tags"]), resize_label(final, height, width),
                                    None if gt is None else resize_label(gt, height, width), cam_net, affinity_net,
                                    preset, class_names)
        except Exception as e:  # one bad sample must not lose the others
            failed[image_id] = redact(f"{type(e).__name__}: {e}")[:300]
            continue
        write_bytes(join(folder, f"{image_id}.png"), encode_png(picture))
    return failed


def write_report(output: str, rows: list[dict[str, Any]], preset: Preset, cam_weights: str,
                 affinity_weights: str, class_names: list[str], summary: dict[str, Any],
                 metrics: dict[str, Any] | None, review: Sequence[dict[str, Any]] = (),
                 num_samples: int = 8, num_review_pictures: int = 8) -> list[str]:
    """`<output>/report/`: index.html and index.md (`quality_sections`, the review list, samples),
    review.csv, and the pictures; returns the URIs written (pictures, review.csv, index.md, index.html).

    rows: `readers.corpus_rows` dicts (image_id, image, tags multi-hot, tag_names, gt_uri), the
    samples (the first `num_samples` with a label in labels/); review: the least trustworthy
    images first (`quality.review_rows`: those dicts and `quality`), pictured up to
    `num_review_pictures`. The pictures are drawn in one Ray task (`draw_pictures`, with the
    resources of a network actor). A sample that cannot be drawn is listed with the reason
    instead of failing the report.
    """
    folder, labels = OutputLayout(output).report, OutputLayout(output).labels
    reviewed = list(review[:num_review_pictures])
    samples = [r for r in rows if exists(join(labels, f"{r['image_id']}.png"))][:num_samples]
    unique = list({r["image_id"]: r for r in [*reviewed, *samples]}.values())
    p = preset.pipeline
    task = ray.remote(draw_pictures).options(
        num_cpus=p.gpu_actor_cpus, num_gpus=p.gpu_actor_gpus if ray.cluster_resources().get("GPU", 0) else 0)
    not_drawn = ray.get(task.remote(unique, output, preset, cam_weights, affinity_weights, class_names))
    written: list[str] = []
    failed: list[str] = []

    def pictures(picked: Sequence[dict[str, Any]], caption: str) -> list[tuple[str, str]]:
        out = []
        for row in picked:
            image_id = row["image_id"]
            if image_id in not_drawn:
                failed.append(f"{image_id}: {not_drawn[image_id]}")
                continue
            written.append(join(folder, f"{image_id}.png"))
            names = ", ".join(tag_names(np.asarray(row["tags"]), class_names))
            out.append((f"{image_id}.png", f"{image_id} ({names})" + caption.format(**row)))
        return out

    sections = quality_sections(summary, metrics)
    if review:
        written.append(write_review_csv(join(folder, "review.csv"), review))
        sections.append(Section(
            "Check these first", lines=[
                "The images of lowest quality score (shards/ column `quality`; review.csv lists "
                f"the {len(review)} lowest): where a person should look or correct first."],
            pictures=pictures(reviewed, ", quality {quality:.2f}")))
    sections.append(Section("Samples", lines=[
        "Each picture: image (with its tags) | CAM of the tagged classes, argmax with background "
        f"(1 - max)^{preset.walk.alpha:g} | random walk (AffinityNet, beta {preset.walk.beta:g}, "
        f"t {preset.walk.t}), argmax | final label (labels/, after the CRF) | ground truth (if any)."],
        pictures=pictures(samples, "")))
    if failed:
        sections.append(Section("Samples that could not be drawn", lines=failed))
    title = "psa_ray label report"
    intro = [f"Preset {preset.name}, CAM weights {cam_weights}, AffinityNet weights {affinity_weights}."]
    for name, text in (("index.md", markdown_report(title, intro, sections)),
                       ("index.html", html_report(title, intro, sections))):
        write_bytes(join(folder, name), text.encode())
        written.append(join(folder, name))
    return written


def write_review_csv(uri: str, review: Sequence[dict[str, Any]]) -> str:
    """review.csv: rank, image_id, quality, tags, image URI, label file, least trustworthy first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rank", "image_id", "quality", "tags", "image", "label"])
    for rank, row in enumerate(review, 1):
        writer.writerow([rank, row["image_id"], f"{row['quality']:.4f}", row["tag_names"],
                         row["image"], f"labels/{row['image_id']}.png"])
    write_bytes(uri, buffer.getvalue().encode())
    return uri
