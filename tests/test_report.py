"""Label-quality tooling: pictures (visualize, report), scoring folders (evaluate.py), predict.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from psa_ray.config import PRESETS, CamConfig, WalkConfig
from psa_ray.data.synthetic import CLASS_NAMES, SyntheticConfig, write_corpus
from psa_ray.io.images import encode_png
from psa_ray.io.inputs import read_corpus
from psa_ray.io.palette import colorize, decode_label_png, encode_label_png
from psa_ray.io.storage import join, list_files, read_bytes, write_bytes
from psa_ray.ops.visualize import PAD, legend_entries, overlay, panel_grid
from psa_ray.pipeline.readers import corpus_rows
from psa_ray.ops.forward import segment_probabilities
from psa_ray.io.inputs import read_images
from psa_ray.pipeline.report import DISPLAY_SIDE, write_report
from psa_ray.pipeline.scoring import ScoringError, score_folders
from psa_ray.pipeline.writers import error_table, write_table
from psa_ray.models.networks import build_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = len(CLASS_NAMES)
# VOC palette entries, from the devkit's bit pattern (index bits 0,1,2 -> MSB of R,G,B, ...).
GREEN, GREY, IGNORE_COLOUR = (0, 128, 0), (128, 128, 128), (224, 224, 192)


def _find_block(picture: np.ndarray, block: np.ndarray, left: int) -> int | None:
    """The top row at which block appears unchanged in picture with its left edge at `left`."""
    h, w = block.shape[:2]
    for top in range(picture.shape[0] - h + 1):
        if np.array_equal(picture[top:top + h, left:left + w], block):
            return top
    return None


def _panel(picture: np.ndarray, top: int, size: tuple[int, int], factor: int, i: int) -> np.ndarray:
    """Panel i of a report picture whose panels start at row `top`, enlarged `factor` times from
    an image of `size` (height, width): one pixel per original pixel."""
    height, width = size
    left = PAD + i * (width * factor + PAD)
    return picture[top:top + height * factor:factor, left:left + width * factor:factor]


# --------------------------------------------------------------------------- visualize

def test_overlay_blends_palette_colour_on_labelled_pixels_only():
    rgb = np.full((2, 3, 3), (100, 50, 200), np.uint8)
    label = np.array([[0, 1, 2], [255, 0, 1]], np.uint8)
    out = overlay(rgb, label, opacity=0.5)
    assert out[0, 0].tolist() == [100, 50, 200] and out[1, 1].tolist() == [100, 50, 200]
    assert out[0, 1].tolist() == [114, 25, 100]          # (100+128)/2, 50/2, 200/2
    assert out[0, 2].tolist() == [50, 89, 100]           # 100/2, (50+128)/2, 200/2
    assert out[1, 0].tolist() == [162, 137, 196]         # halfway to the ignore colour (224,224,192)


def test_panel_grid_copies_panels_in_order_under_titles_with_a_legend():
    colours = [(10, 200, 30), (200, 10, 30), (30, 10, 200)]
    panels = [np.full((20, 30, 3), c, np.uint8) for c in colours]
    legend = [("background", (0, 0, 0)), ("bird", (64, 0, 128))]
    grid = panel_grid(panels, ["one", "two", "three"], legend)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[1] >= 3 * 30
    boxes = []
    for colour in colours:
        ys, xs = np.nonzero(np.all(grid == colour, axis=-1))
        assert ys.size == 20 * 30, "each panel appears exactly once, whole"
        boxes.append((ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    assert all(b[2:] == (20, 30) for b in boxes)
    assert len({b[0] for b in boxes}) == 1, "panels side by side"
    assert boxes[0][1] < boxes[1][1] < boxes[2][1], "panels in the given order"
    top, bottom = boxes[0][0], boxes[0][0] + 20
    above = grid[:top]
    assert (above != 255).any(), "titles are drawn above the panels"
    ys, _ = np.nonzero(np.all(grid == (64, 0, 128), axis=-1))
    assert ys.size and ys.min() >= bottom, "the legend swatch is below the panels"
    with pytest.raises(ValueError):
        panel_grid([panels[0], np.zeros((10, 30, 3), np.uint8)], ["a", "b"])


def test_legend_lists_values_present_with_names_and_palette_colours():
    labels = [np.array([[0, 2], [255, 0]], np.uint8), np.array([[7, 2]], np.uint8)]
    assert legend_entries(labels, ["cat", "dog", "cow"]) == [
        ("background", (0, 0, 0)), ("dog", GREEN), ("label 7", GREY), ("ignore", IGNORE_COLOUR)]


# --------------------------------------------------------------------------- report

def test_write_report_draws_labeled_samples_and_an_index(ray_cluster, tmp_path, save_network):
    corpus_root, output = str(tmp_path / "corpus"), str(tmp_path / "out")
    corpus, _ = read_corpus(write_corpus(corpus_root, SyntheticConfig(num_images=4, seed=2)))
    rows = corpus_rows(corpus, join(corpus_root, "gt"))
    torch.manual_seed(0)
    cam_w = save_network(output, "cam", build_network("cam", "tiny", C))
    affinity_w = save_network(output, "affinity", build_network("affinity", "tiny", C))
    # rows[0]: label = gt; rows[1]: no label (an error row); rows[2]: a label but an unreadable
    # image; rows[3]: a hand-made label. Three samples asked: rows 0, 2 and 3.
    labels = {}
    for row in (rows[0], rows[2], rows[3]):
        gt = decode_label_png(read_bytes(row["gt_uri"]))
        stripes = np.zeros_like(gt)
        stripes[:, ::2] = 1
        labels[row["image_id"]] = gt if row is rows[0] else stripes
        write_bytes(join(output, "labels", f"{row['image_id']}.png"),
                    encode_label_png(labels[row["image_id"]]))
    rows[2] = {**rows[2], "image": str(tmp_path / "missing.png")}
    metrics = {"class_names": ["background", *CLASS_NAMES], "images": 4,
               **{v: {"miou": 0.5, "iou": [0.5] * (C + 1)} for v in ("cam", "cam_crf", "rw", "rw_crf")}}
    preset = replace(PRESETS["demo"], cam=CamConfig(scales=(1.0,), flip=False), walk=WalkConfig(t=16))

    summary = {"warnings": ["class 'mallard' covers little"]}
    review = [{**rows[3], "quality": 0.125}]
    written = write_report(output, rows, preset, cam_w, affinity_w, list(CLASS_NAMES), summary, metrics,
                           review, num_samples=3)

    drawn = [rows[0], rows[3]]
    report = join(output, "report")
    assert written == [join(report, "review.csv"), join(report, f"{rows[3]['image_id']}.png")] + \
        [join(report, f"{r['image_id']}.png") for r in drawn] + [join(report, "index.md"), join(report, "index.html")]
    review_csv = read_bytes(join(report, "review.csv")).decode().splitlines()
    assert review_csv[1].startswith(f"1,{rows[3]['image_id']},0.1250,{rows[3]['tag_names']},")
    for row in drawn:
        picture = np.asarray(Image.open(join(report, f"{row['image_id']}.png")).convert("RGB"))
        rgb = np.asarray(Image.open(row["image"]).convert("RGB"))
        gt = decode_label_png(read_bytes(row["gt_uri"]))
        height, width = rgb.shape[:2]
        factor = max(1, DISPLAY_SIDE // max(height, width))
        top = _find_block(picture, np.repeat(np.repeat(rgb, factor, 0), factor, 1), PAD)
        assert top is not None, "the image panel comes first, enlarged by whole pixels"
        panels = [_panel(picture, top, (height, width), factor, i) for i in range(5)]
        assert np.array_equal(panels[3], colorize(labels[row["image_id"]])), "final label from labels/"
        assert np.array_equal(panels[4], colorize(gt)), "ground truth panel"
        # CAM and walk panels colour pixels with the tagged classes only (untagged never appear).
        tagged = np.flatnonzero(row["tags"]) + 1
        allowed = [rgb] + [overlay(rgb, np.full(gt.shape, k, np.uint8)) for k in tagged]
        for i in (1, 2):
            matches = np.zeros(gt.shape, bool)
            for candidate in allowed:
                matches |= np.all(panels[i] == candidate, axis=-1)
            assert matches.all()
    for page, picture in ((written[-2], "({}.png)"), (written[-1], "src='{}.png'")):
        index = read_bytes(page).decode()
        assert "mIoU" in index and "rw_crf" in index and "mallard" in index
        for row in drawn:
            assert picture.format(row["image_id"]) in index
        assert rows[1]["image_id"] not in index
        assert "quality 0.12" in index[index.index("Check these first"):index.index("Samples")]
        failed = index[index.index("could not be drawn"):]
        assert rows[2]["image_id"] in failed and "missing.png" in failed


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# headless, as root, on a machine with no network: no sandbox, GPU or background connections
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


@pytest.mark.slow
def test_the_html_report_shows_its_tables_and_pictures_in_headless_chromium(quick_job, tmp_path):
    """conftest's quick job wrote report/index.html: Chromium renders its tables (DOM) and its
    pictures (a screenshot holds the label panels' palette colours, which no text on the page has)."""
    if CHROMIUM is None:
        if os.environ.get("PSA_RAY_REQUIRE_CHROMIUM"):
            pytest.fail("PSA_RAY_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    job, summary = quick_job
    page = "file://" + join(job.output, "report", "index.html")

    def chromium(*args: str) -> str:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    dom = chromium("--dump-dom")
    assert dom.count("<table>") >= 2 and "rw_crf" in dom and "tag AP %" in dom
    assert "Check these first" in dom and dom.count("<img ") >= 2
    assert all(w.split("'")[1] in dom for w in summary["warnings"])
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,5000")
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    class_colours = colorize(np.arange(1, C + 1, dtype=np.uint8)[None])[0]
    painted = (pixels[:, None, :] == class_colours[None]).all(axis=-1).any(axis=-1)
    assert painted.sum() > 2000, f"only {painted.sum()} pixels of class colours: pictures not shown"


# --------------------------------------------------------------------------- scoring, evaluate.py

def _write_scoring_folders(labels: str, gt: str) -> None:
    """Pixel pairs (gt, label), gt 255 ignored: a: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0);
    b: (1,1) (1,255) (0,0) (2,2). Hand counts (label 255 on gt 1 is a miss of class 1 and no
    class's prediction, as in confusion_matrix): class 0 TP 2, gt 3, pred 3 -> 2/4; class 1 TP 3,
    gt 4, pred 4 -> 3/5; class 2 TP 2, gt 3, pred 2 -> 2/3."""
    pairs = {"a": ([[0, 0, 1, 1], [2, 2, 255, 255]], [[0, 1, 1, 1], [2, 0, 2, 1]]),
             "b": ([[1, 1], [0, 2]], [[1, 255], [0, 2]])}
    for image_id, (gt_map, label_map) in pairs.items():
        write_bytes(join(gt, f"{image_id}.png"), encode_label_png(np.array(gt_map, np.uint8)))
        write_bytes(join(labels, f"{image_id}.png"), encode_label_png(np.array(label_map, np.uint8)))
    write_bytes(join(labels, "only_label.png"), encode_label_png(np.zeros((2, 2), np.uint8)))
    write_bytes(join(gt, "only_gt.png"), encode_label_png(np.zeros((2, 2), np.uint8)))


def test_score_folders_matches_hand_counted_iou(tmp_path, s3_bucket):
    labels, gt = str(tmp_path / "labels"), join(s3_bucket, "gt")
    _write_scoring_folders(labels, gt)
    inferred = score_folders(labels, gt)
    assert inferred["num_classes"] == 3 and inferred["images"] == 2
    assert inferred["iou"] == pytest.approx([0.5, 0.6, 2 / 3])
    assert inferred["miou"] == pytest.approx((1.1 + 2 / 3) / 3)
    assert inferred["labels_without_gt"] == ["only_label"] and inferred["gt_without_labels"] == ["only_gt"]
    four = score_folders(labels, gt, num_classes=4)
    assert four["iou"][:3] == pytest.approx([0.5, 0.6, 2 / 3]) and four["iou"][3] is None
    assert four["miou"] == pytest.approx((1.1 + 2 / 3) / 3)
    with pytest.raises(ScoringError, match="value"):
        score_folders(labels, gt, num_classes=2)                 # gt holds 2
    write_bytes(join(labels, "b.png"), encode_label_png(np.zeros((3, 2), np.uint8)))
    with pytest.raises(ScoringError, match="b: label"):
        score_folders(labels, gt)
    with pytest.raises(ScoringError, match="no label PNGs"):
        score_folders(str(tmp_path / "nothing"), gt)


def test_evaluate_cli_prints_table_writes_json_and_reports_unmatched(tmp_path):
    labels, gt, out = str(tmp_path / "labels"), str(tmp_path / "gt"), str(tmp_path / "iou.json")
    _write_scoring_folders(labels, gt)
    cmd = [sys.executable, os.path.join(REPO, "jobs", "evaluate.py")]
    done = subprocess.run(cmd + [labels, "--gt", gt, "--classes", "cat,dog", "--json", out],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split()[-1] for line in done.stdout.splitlines()[1:]}
    assert lines == {"class": "IoU", "background": "50.0", "cat": "60.0", "dog": "66.7", "mIoU": "58.9"}
    assert "1 labels have no ground truth" in done.stderr and "only_label" in done.stderr
    assert "1 ground-truth files have no label" in done.stderr and "only_gt" in done.stderr
    result = json.loads(open(out).read())
    assert result["class_names"] == ["background", "cat", "dog"]
    assert result["miou"] == pytest.approx((1.1 + 2 / 3) / 3) and result["images"] == 2
    missing = subprocess.run(cmd + [str(tmp_path / "nowhere"), "--gt", gt], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "no label PNGs" in missing.stderr


# --------------------------------------------------------------------------- predict

def test_read_images_from_a_manifest_without_tags(tmp_path):
    manifest = tmp_path / "new.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"image_id": "a", "image": "images/a.png"}, {"image_id": "a", "image": "images/b.png"},
        {"image_id": "x/y", "image": "images/c.png"}, {"image_id": "d", "image": "s3://bucket/d.jpg"}]))
    rows, errors = read_images(str(manifest))
    assert rows == [{"image_id": "a", "image": str(tmp_path / "images" / "a.png")},
                    {"image_id": "d", "image": "s3://bucket/d.jpg"}]
    assert [e.error for e in errors] == ["duplicate_id", "bad_id"]


@pytest.mark.slow
def test_segment_probabilities_of_a_batch_match_each_image_alone():
    """Images of one size share a DeepLab forward pass; each still gets its own probabilities."""
    torch.manual_seed(0)
    net = build_network("deeplab", "tiny", C).eval()
    images = [torch.randn(3, 40, 56), torch.randn(3, 48, 40), torch.randn(3, 40, 56)]
    for image, probs in zip(images, segment_probabilities(net, images), strict=True):
        assert probs.shape == (C + 1, *image.shape[1:])
        torch.testing.assert_close(probs, segment_probabilities(net, [image])[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(probs.sum(dim=0), torch.ones(image.shape[1:]))


def test_predict_job_labels_a_folder_and_records_bad_images(ray_cluster, tmp_path, save_network):
    folder, output = str(tmp_path / "photos"), str(tmp_path / "predicted")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 52, 3), np.uint8)
    write_bytes(join(folder, "one.png"), encode_png(rgb))
    write_bytes(join(folder, "sub", "two.jpg"), encode_png(rgb[:36, :44]))  # PNG bytes, .jpg name
    write_bytes(join(folder, "broken.png"), b"not an image")
    write_bytes(join(folder, "notes.txt"), b"not listed")
    # A DeepLab whose logits are 5 for class 2 and 0 elsewhere at every pixel.
    net = build_network("deeplab", "tiny", C)
    with torch.no_grad():
        for conv in net.aspp:
            conv.weight.zero_()
            conv.bias.zero_()
        net.aspp[0].bias[2] = 5.0
    checkpoint = save_network(str(tmp_path / "run"), "deeplab", net)
    cmd = [sys.executable, os.path.join(REPO, "jobs", "predict.py"), "--checkpoint", checkpoint,
           "--input", folder, "--output", output, "--preset", "demo"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(read_bytes(join(output, "predict.json")))
    counts = summary["counts"]
    assert {k: counts[k] for k in ("images", "processed", "labeled", "errors", "skipped")} == \
        {"images": 3, "processed": 3, "labeled": 2, "errors": 1, "skipped": 0}

    labels = list_files(join(output, "labels"), suffix=".png")
    assert sorted(u.rsplit("/", 1)[-1] for u in labels) == ["one.png", "sub__two.png"]
    for image_id, shape in (("one", (40, 52)), ("sub__two", (36, 44))):
        label = decode_label_png(read_bytes(join(output, "labels", f"{image_id}.png")))
        assert label.shape == shape and (label == 2).all()
    shards = pq.read_table(list_files(join(output, "shards"), suffix=".parquet")[0]).to_pylist()
    confidence = np.exp(5.0) / (np.exp(5.0) + C)                # C other classes at logit 0
    for shard in shards:
        assert shard["tags"] == [CLASS_NAMES[1]]
        assert shard["class_fractions"] == pytest.approx([0, 0, 1] + [0] * (C - 2))
        assert shard["mean_confidence"] == pytest.approx(confidence, rel=1e-4)
    errors = pq.read_table(list_files(join(output, "errors"), suffix=".parquet")[0]).to_pylist()
    assert [(e["image_id"], e["error"]) for e in errors] == [("broken", "decode")]

    # a rerun skips what is done, and retries a row whose storage kept failing (a transient error)
    write_bytes(join(folder, "three.png"), encode_png(rgb))
    write_table(join(output, "errors", "earlier.parquet"), error_table([
        {"image_id": "three", "image": join(folder, "three.png"), "stage": "read", "error": "unavailable"}]))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    counts = json.loads(read_bytes(join(output, "predict.json")))["counts"]
    assert {k: counts[k] for k in ("images", "skipped", "processed", "labeled", "errors")} == \
        {"images": 4, "skipped": 3, "processed": 1, "labeled": 3, "errors": 1}
