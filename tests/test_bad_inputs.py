"""Bad inputs: every broken, odd or unsafe input row becomes an error row with a reason (or is
labeled like any other image), never a crash, and large images come back at their own size."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from psa_ray.config import PipelineConfig, WalkConfig
from psa_ray.data.synthetic import CLASS_NAMES, SyntheticConfig, make_sample, write_corpus
from psa_ray.io.images import decode_image, decode_scaled, processing_size
from psa_ray.io.manifest_writer import write_manifest
from psa_ray.io.rows import MAX_ID_BYTES, CorpusRow, ManifestError
from psa_ray.io.inputs import read_corpus
from psa_ray.io.palette import decode_label_png, encode_label_png
from psa_ray.io.storage import join, list_files, read_bytes, write_bytes
from psa_ray.pipeline import readers
from psa_ray.pipeline.actors import RefineActor
from psa_ray.pipeline.labeling import LabelJob, run
from psa_ray.pipeline.readers import decode_rows
from psa_ray.pipeline.writers import read_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _scene(height: int, width: int) -> np.ndarray:
    """A smooth RGB image (gradients: survives JPEG and resizing) with a distinct colour per quadrant."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.zeros((height, width, 3), np.float64)
    rgb[..., 0] = np.where(xx < width // 2, 220, 30)
    rgb[..., 1] = np.where(yy < height // 2, 200, 40)
    rgb[..., 2] = 60 + 100 * xx / width
    return rgb.astype(np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand from filtered-free scanlines (each row: filter byte 0 + samples)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw_rows))
            + _png_chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(_encoded(Image.fromarray(_scene(40, 40)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _objects(*values) -> np.ndarray:
    """An object column (one array per row), as Ray Data hands ragged tensors to a UDF."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def _batch(uris: list[str]) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands it to decode_rows."""
    return {"image_id": np.array([f"r{i}" for i in range(len(uris))], dtype=object),
            "image": np.array(uris, dtype=object)}


# --------------------------------------------------------------------------- broken files


def test_broken_files_become_error_rows_with_reasons(tmp_path):
    jpeg = _encoded(Image.fromarray(_scene(64, 80)), "JPEG", quality=90)
    png = _encoded(Image.fromarray(_scene(64, 80)), "PNG")
    idat = png.index(b"IDAT")
    garbled_png = png[: idat + 20] + bytes(b ^ 0x5A for b in png[idat + 20: idat + 60]) + png[idat + 60:]
    sof = jpeg.index(b"\xff\xc0")
    garbled_jpeg_header = jpeg[:sof] + b"\xff\xc0\x00\x02" + jpeg[sof + 4: sof + 6] + b"\xde\xad" * 40
    (tmp_path / "folder.png").mkdir()
    cases = {  # file name: (bytes or None = not written, error code, reason in the message)
        "good.jpg": (jpeg, "", ""),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "decode", "truncated"),
        "garbled_header.jpg": (garbled_jpeg_header, "decode", "corrupt"),
        "truncated.png": (png[: len(png) // 2], "decode", "truncated"),
        "garbled_data.png": (garbled_png, "decode", "corrupt PNG data"),
        "empty.png": (b"", "decode", "empty file"),
        "error_page.jpg": (b"<html><body><h1>403 Forbidden</h1></body></html>", "decode", "not an image"),
        "vector.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 640 480\n", "decode", "not an image"),
        "tiny.png": (_encoded(Image.fromarray(_scene(20, 300)), "PNG"), "decode", "too small: 300x20"),
        "bomb.jpg": (_jpeg_claiming(12_000, 12_000), "decode", "too large: 12000x12000"),
        "pillow_bomb.jpg": (_jpeg_claiming(30_000, 30_000), "decode", "decompression bomb"),
        "missing.png": (None, "missing", "not found"),
        "folder.png": (None, "read", "directory"),
        "good.png": (png, "", ""),
    }
    for name, (data, _, _) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    out = decode_rows(_batch([str(tmp_path / name) for name in cases]))

    for i, (name, (_, code, reason)) in enumerate(cases.items()):
        assert out["error"][i] == code, (name, out["message"][i])
        assert reason in out["message"][i], (name, out["message"][i])
        if code:
            assert out["stage"][i] == "read" and out["rgb"][i].shape == (1, 1, 3)
            assert (out["orig_height"][i], out["orig_width"][i]) == (0, 0)
        else:
            assert out["stage"][i] == "" and out["rgb"][i].shape == (64, 80, 3)
            assert (out["orig_height"][i], out["orig_width"][i]) == (64, 80)
    assert np.array_equal(out["rgb"][len(cases) - 1], _scene(64, 80)), "bad rows leave good ones intact"


def test_missing_object_on_s3_is_an_error_row(s3_bucket):
    good = join(s3_bucket, "images", "good.png")
    write_bytes(good, _encoded(Image.fromarray(_scene(40, 48)), "PNG"))
    out = decode_rows(_batch([join(s3_bucket, "images", "gone.png"), good]))
    assert list(out["error"]) == ["missing", ""]
    assert "not found" in out["message"][0] and "gone.png" in out["message"][0]
    assert out["rgb"][1].shape == (40, 48, 3)


def test_file_over_the_byte_limit_is_rejected_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_IMAGE_BYTES", 1000)
    (tmp_path / "video.jpg").write_bytes(os.urandom(5000))
    out = decode_rows(_batch([str(tmp_path / "video.jpg")]))
    assert out["error"][0] == "too_large" and "limit of 1000 bytes" in out["message"][0]


# --------------------------------------------------------------------------- colour modes


def test_every_colour_mode_decodes_to_the_expected_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    rgb16 = rgb.astype(">u2") * 257  # v * 257 maps 0..255 onto 0..65535 exactly
    grey16_alpha = np.stack([grey.astype(">u2") * 257, np.full_like(grey, 9, dtype=">u2")], axis=2)
    cmy = rgb.copy()
    cmyk = Image.fromarray(np.concatenate([255 - cmy, np.zeros((36, 44, 1), np.uint8)], axis=2), "CMYK")
    bits = grey > 127
    cases = {  # file: (bytes, expected RGB computed by hand)
        "grey.png": (_encoded(Image.fromarray(grey), "PNG"), np.stack([grey] * 3, axis=2)),
        "grey_alpha.png": (_encoded(Image.fromarray(np.stack([grey, grey // 2], axis=2), "LA"), "PNG"),
                           np.stack([grey] * 3, axis=2)),
        "rgba.webp": (_encoded(Image.fromarray(np.concatenate([rgb, rgb[..., :1]], axis=2)), "WEBP",
                               lossless=True, exact=True), rgb),
        "one_bit.png": (_encoded(Image.fromarray(bits), "PNG"), np.stack([bits * 255] * 3, axis=2)),
        "rgb16.png": (_png(44, 36, 16, 2, b"".join(b"\0" + row.tobytes() for row in rgb16)), rgb),
        "grey16_alpha.png": (_png(44, 36, 16, 4, b"".join(b"\0" + row.tobytes() for row in grey16_alpha)),
                             np.stack([grey] * 3, axis=2)),
        "cmyk.tiff": (_encoded(cmyk, "TIFF"), cmy),  # K = 0: R, G, B = 255 - C, M, Y
        "rgb.bmp": (_encoded(Image.fromarray(rgb), "BMP"), rgb),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    out = decode_rows(_batch([str(tmp_path / name) for name in cases]))
    for i, (name, (_, expected)) in enumerate(cases.items()):
        assert out["error"][i] == "", (name, out["message"][i])
        assert out["rgb"][i].dtype == np.uint8 and np.array_equal(out["rgb"][i], expected), name


# --------------------------------------------------------------------------- sizes and orientation


def test_processing_size_keeps_aspect_and_a_usable_short_side():
    assert processing_size(1200, 3000, 1000) == (400, 1000)
    assert processing_size(3000, 1200, 1000) == (1000, 400)
    assert processing_size(500, 800, 1000) == (500, 800)      # small images are never enlarged
    assert processing_size(5000, 9000, None) == (5000, 9000)
    # 40 x 10000: shrinking to 2048 would leave 8 px; the short side stops at min_side instead.
    assert processing_size(40, 10_000, 2048, min_side=32) == (32, 8000)


def _block_mean(rgb: np.ndarray, factor: int) -> np.ndarray:
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    return rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))


def test_large_png_is_area_shrunk_for_processing_and_its_size_recorded(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (1200, 3000, 3), dtype=np.uint8)
    (tmp_path / "wide.png").write_bytes(_encoded(Image.fromarray(rgb), "PNG"))
    out = decode_rows(_batch([str(tmp_path / "wide.png")]), max_side=1000)
    assert out["error"][0] == ""
    assert out["rgb"][0].shape == (400, 1000, 3)
    assert (out["orig_height"][0], out["orig_width"][0]) == (1200, 3000)
    # An exact 3x reduction: each pixel is the mean of a 3x3 block (random noise: any other filter differs).
    assert np.abs(out["rgb"][0].astype(float) - _block_mean(rgb, 3)).max() <= 1.0


def test_large_jpeg_is_decoded_at_reduced_scale_to_the_same_picture(tmp_path):
    big = np.asarray(Image.fromarray(_scene(256, 512)).resize((4096, 2048), Image.Resampling.BILINEAR))
    data = _encoded(Image.fromarray(big), "JPEG", quality=95)
    image = decode_scaled(data, max_side=1024)
    assert image.rgb.shape == (512, 1024, 3) and (image.height, image.width) == (2048, 4096)
    reference = _block_mean(decode_image(data).astype(float), 4)
    assert np.abs(image.rgb - reference).mean() < 2.0


@pytest.mark.parametrize("orientation, turn", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                               (8, lambda a: np.rot90(a, 1))])
def test_exif_rotated_photo_is_upright_at_full_and_processing_size(tmp_path, orientation, turn):
    stored = _scene(600, 1000)
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "photo.jpg").write_bytes(_encoded(Image.fromarray(stored), "JPEG", quality=95,
                                                  exif=exif.tobytes()))
    upright = turn(stored)
    out = decode_rows(_batch([str(tmp_path / "photo.jpg")]), max_side=500)
    assert (out["orig_height"][0], out["orig_width"][0]) == upright.shape[:2]
    shrunk = out["rgb"][0]
    assert shrunk.shape[:2] == processing_size(*upright.shape[:2], 500)
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(upright)).resize(shrunk.shape[1::-1]))
    assert np.abs(shrunk.astype(int) - expected).mean() < 4
    full = decode_image((tmp_path / "photo.jpg").read_bytes())
    assert full.shape == upright.shape and np.abs(full.astype(int) - upright).mean() < 4


def test_mask_at_full_size_is_resized_with_the_image(tmp_path):
    (tmp_path / "big.png").write_bytes(_encoded(Image.fromarray(_scene(300, 1000)), "PNG"))
    mask = np.zeros((300, 1000), np.uint8)
    mask[:, 500:] = 3
    (tmp_path / "mask.png").write_bytes(encode_label_png(mask))
    batch = {**_batch([str(tmp_path / "big.png")]), "mask_uri": np.array([str(tmp_path / "mask.png")], object)}
    out = decode_rows(batch, max_side=500)
    assert out["error"][0] == "" and out["rgb"][0].shape == (150, 500, 3)
    assert out["mask"][0].shape == (150, 500)
    assert set(np.unique(out["mask"][0][:, :249])) == {0} and set(np.unique(out["mask"][0][:, 251:])) == {3}


def test_refine_actor_restores_the_label_to_the_original_size(tmp_path):
    """A 40 x 96 processing copy of an 80 x 192 image: class 2 on the left, background on the right."""
    height, width, grid = 40, 96, (5, 12)
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (200, 40, 40)
    rgb[:, width // 2:] = (40, 40, 200)
    walked = np.zeros((2, *grid), np.float32)  # background, then class 2
    walked[1, :, :6], walked[0, :, 6:] = 1.0, 1.0
    walked += 0.05
    gt = np.zeros((80, 192), np.uint8)
    gt[:, :96] = 2
    write_bytes(str(tmp_path / "gt.png"), encode_label_png(gt))
    cams = np.zeros((1, height, width), np.float16)
    cams[0, :, : width // 2] = 1.0
    batch = {"image_id": _objects("wide"), "image": _objects("wide.png"), "tag_names": _objects(["c2"]),
             "rgb": _objects(rgb), "class_ids": _objects(np.array([2])), "walked": _objects(walked),
             "cams": _objects(cams), "gt_uri": _objects(str(tmp_path / "gt.png")),
             "orig_height": np.array([80]), "orig_width": np.array([192]),
             "stage": _objects(""), "error": _objects(""), "message": _objects("")}
    out = RefineActor(WalkConfig(), 4.0, num_classes=3, evaluate=True)(batch)
    assert out["error"][0] == "", out["message"][0]
    label = decode_label_png(out["label_png"][0])
    assert label.shape == (80, 192) and (out["height"][0], out["width"][0]) == (80, 192)
    assert np.all(label[:, :90] == 2) and np.all(label[:, 102:] == 0)
    assert np.isclose(out["class_fractions"][0][2], (label == 2).mean())
    for variant in ("cam", "cam_crf", "rw", "rw_crf"):  # scored at the ground truth's (full) size
        assert out[f"cm_{variant}"][0].sum() == 80 * 192


def test_a_row_that_breaks_a_batch_becomes_the_only_error_row(tmp_path, save_network):
    """NetworkActor runs a batch's rows in one call; a row that makes it fail (tags of the wrong
    length) is redone alone and becomes the one error row, and the other rows get the walked
    scores they get on their own."""
    from psa_ray.config import CamConfig
    from psa_ray.pipeline.actors import NetworkActor
    from psa_ray.models.networks import build_network

    torch.manual_seed(0)
    classes = len(CLASS_NAMES)
    actor = NetworkActor(save_network(str(tmp_path), "cam", build_network("cam", "tiny", classes)),
                     CamConfig(scales=(0.5, 1.0)),
                     save_network(str(tmp_path), "affinity", build_network("affinity", "tiny", classes)),
                     WalkConfig(t=16), mixed_precision=False)
    rng = np.random.default_rng(0)
    rgbs = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(40, 56, 3), (48, 40, 3), (40, 56, 3)]]
    tags = [np.eye(classes, dtype=np.float32)[0], np.ones(classes + 1, np.float32),
            np.eye(classes, dtype=np.float32)[2]]

    def batch(rows):
        return {"image_id": _objects(*[f"r{i}" for i in rows]), "rgb": _objects(*[rgbs[i] for i in rows]),
                "tags": _objects(*[tags[i] for i in rows]), "stage": _objects(*[""] * len(rows)),
                "error": _objects(*[""] * len(rows)), "message": _objects(*[""] * len(rows))}

    out = actor(batch([0, 1, 2]))
    assert list(out["error"]) == ["", "ValueError", ""] and out["stage"][1] == "walk"
    assert "tags" in out["message"][1]
    for i in (0, 2):
        np.testing.assert_allclose(out["walked"][i], actor(batch([i]))["walked"][0], rtol=1e-4, atol=1e-5)
        assert out["class_ids"][i].tolist() == [1 + tags[i].argmax()]


# --------------------------------------------------------------------------- manifest rows


def test_unsafe_clashing_or_odd_ids_are_error_rows(tmp_path):
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image_id": i, "image": "a.png", "tags": ["cat"]}) + "\n"
                                              for i in ["ok", "../../etc/cron.d/x", "..", "a/b", "..\\x",
                                                        "tab\tid", "x" * (MAX_ID_BYTES + 1), " ok ",
                                                        "é" * (MAX_ID_BYTES // 2), "2007_000032.v2"])
                                      + '{"image_id": "\\ud800", "image": "a.png", "tags": ["cat"]}\n')
    corpus, errors = read_corpus(str(tmp_path / "m.jsonl"), classes=["cat"])
    assert [r.image_id for r in corpus.rows] == ["ok", "é" * (MAX_ID_BYTES // 2), "2007_000032.v2"]
    assert [e.error for e in errors] == ["bad_id"] * 6 + ["duplicate_id", "bad_id"]
    reasons = [e.message for e in errors]
    assert "contains '/'" in reasons[0] and "contains '..'" in reasons[1] and "contains '/'" in reasons[2]
    assert "contains '\\'" in reasons[3] and "control character" in reasons[4] and "bytes long" in reasons[5]
    assert "not valid Unicode" in reasons[7] and errors[7].image_id == "\\ud800"


def test_unknown_and_empty_tags_in_csv(tmp_path):
    (tmp_path / "m.csv").write_text("image_id,image,tags\n"
                                    "a,a.png, dog |cat||dog\n"
                                    "b,b.png,\n"
                                    "c,c.png,Cat\n"
                                    "d,d.png,cat|unicorn\n"
                                    "e,e.png,|\n")
    corpus, errors = read_corpus(str(tmp_path / "m.csv"), classes=["cat", "dog"])
    assert [(r.image_id, r.tags) for r in corpus.rows] == [("a", ["dog", "cat"])]
    assert [(e.image_id, e.error) for e in errors] == [("b", "no_tags"), ("c", "unknown_tag"),
                                                       ("d", "unknown_tag"), ("e", "no_tags")]
    assert "'Cat'" in errors[1].message and "'unicorn'" in errors[2].message and "'cat'" not in errors[2].message


# --------------------------------------------------------------------------- the job as a whole


def test_manifest_problems_stop_the_job_before_any_work(ray_cluster, tmp_path):
    good_row = "a,images/a.png,cat\n"
    ids_as_numbers = io.BytesIO()
    pq.write_table(pa.table({"image_id": [1, 2], "image": ["a.png", "b.png"], "tags": [["cat"], ["dog"]]}),
                   ids_as_numbers)
    cases = {  # manifest file: (content, classes option, the message's key phrase)
        "no_tags_column.csv": (b"image_id,image\na,a.png\n", "cat,dog", "lacks required column(s) tags"),
        "ids_as_numbers.parquet": (ids_as_numbers.getvalue(), "cat,dog", "column image_id must be string"),
        "no_classes.csv": (("image_id,image,tags\n" + good_row).encode(), None, "no class names"),
        "classes_gone.csv": (("image_id,image,tags\n" + good_row).encode(), str(tmp_path / "gone.txt"),
                             "classes file"),
        "unknown_classes.csv": (b"image_id,image,tags\na,a.png,owl\nb,b.png,bat\n", "cat,dog",
                                "all 2 rows"),
    }
    for name, (content, classes, phrase) in cases.items():
        (tmp_path / name).write_bytes(content)
        output = tmp_path / f"out_{name}"
        with pytest.raises(ManifestError) as info:
            run(LabelJob(output=str(output), input=str(tmp_path / name), classes=classes))
        assert phrase in str(info.value) and name in str(info.value), str(info.value)
        assert not output.exists(), "nothing is written before the manifest is accepted"


@pytest.mark.slow
def test_user_errors_end_the_job_with_one_error_line_and_status_2(ray_cluster, tmp_path):
    """What the user can fix is one line on stderr, `error: <message>`, exit status 2, no traceback,
    in every job: a missing manifest, unknown classes, missing or unreadable weights."""
    (tmp_path / "unknown.csv").write_bytes(b"image_id,image,tags\na,a.png,owl\n")
    (tmp_path / "good.csv").write_bytes(b"image_id,image,tags\na,a.png,cat\n")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint" * 64)
    missing, garbage = str(tmp_path / "nowhere" / "manifest.parquet"), str(tmp_path / "garbage.pt")
    good = ("--input", str(tmp_path / "good.csv"), "--classes", "cat,dog")
    out = ("--output", str(tmp_path / "out"))
    cases = {  # (job, arguments): the message's key phrase
        ("label_dataset", "--input", missing, *out): "manifest",
        ("label_dataset", "--input", str(tmp_path / "unknown.csv"), "--classes", "cat,dog", *out):
            "unknown tag(s) 'owl'",
        ("label_dataset", *good, "--cam-checkpoint", str(tmp_path / "gone" / "model.pt"), *out): "--cam-checkpoint",
        ("label_dataset", *good, "--backbone-weights", garbage, *out): "not a weights-only PyTorch checkpoint",
        ("label_dataset", *good, "--held-out", "0.7", *out): "--held-out must be in [0, 0.5)",
        ("label_dataset", *good, "--corpus", "hard", *out): "--corpus picks a built-in corpus",
        ("train_cam", "--input", missing, *out): "manifest",
        ("train_cam", *good, "--backbone-weights", garbage, *out): "--backbone-weights",
        ("predict", "--checkpoint", garbage, "--input", str(tmp_path), *out): "--checkpoint",
        ("evaluate", str(tmp_path / "no_labels"), "--gt", str(tmp_path)): "no label PNGs",
    }
    # the jobs run side by side (each is mostly its imports): the 2-core suite's time; each on its
    # own output (a job on an output that another one is writing is refused: io.lease)
    running = {(job, *args): subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", f"{job}.py"),
                                               *[f"{a}_{i}" if a == out[1] else a for a in args]],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env={**os.environ, "RAY_ADDRESS": ray_cluster})
               for i, (job, *args) in enumerate(cases)}
    for (job, *args), phrase in cases.items():
        process = running[(job, *args)]
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (job, args, stderr[-3000:])
        assert "Traceback" not in stderr, (job, args, stderr[-3000:])
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and phrase in last, (job, args, stderr[-3000:])


@pytest.mark.slow
def test_label_job_accounts_for_every_bad_row_and_restores_large_labels(ray_cluster, trained_checkpoints,
                                                                       tmp_path):
    corpus, config = tmp_path / "corpus", SyntheticConfig(num_images=10, seed=3)
    rows = read_corpus(write_corpus(str(corpus), config))[0].rows
    extra, gt = corpus / "extra", corpus / "gt"
    extra.mkdir()

    source = make_sample(4, config)  # a large but sane image: long side above PipelineConfig.max_side
    big_size = (PipelineConfig.max_side + 52, 320)  # (width, height)
    Image.fromarray(source.image).resize(big_size, Image.Resampling.BILINEAR).save(extra / "big.png")
    (gt / "big.png").write_bytes(encode_label_png(np.asarray(
        Image.fromarray(source.mask).resize(big_size, Image.Resampling.NEAREST))))
    cmyk_source = make_sample(7, config)
    Image.fromarray(cmyk_source.image).convert("CMYK").save(extra / "cmyk.jpg", quality=95)
    (gt / "cmyk.png").write_bytes(encode_label_png(cmyk_source.mask))
    png = (corpus / "images" / "syn_000001.png").read_bytes()
    (extra / "corrupt.png").write_bytes(png[: len(png) // 3])
    (extra / "empty.jpg").write_bytes(b"")
    Image.fromarray(source.image[:20, :20]).save(extra / "tiny.png")
    tags = ["cardinal"]
    rows += [CorpusRow("big", "extra/big.png", source.tags), CorpusRow("cmyk", "extra/cmyk.jpg", cmyk_source.tags),
             CorpusRow("corrupt", "extra/corrupt.png", tags), CorpusRow("gone", "extra/gone.png", tags),
             CorpusRow("empty", "extra/empty.jpg", tags), CorpusRow("tiny", "extra/tiny.png", tags),
             CorpusRow("syn_000000", "extra/cmyk.jpg", tags), CorpusRow("../escape", "extra/cmyk.jpg", tags),
             CorpusRow("unknown", "extra/cmyk.jpg", ["dodo"])]
    manifest = str(corpus / "with_bad_rows.jsonl")
    write_manifest(rows, manifest)
    output = str(tmp_path / "out")

    # Trained networks given (training over bad rows: the trained_checkpoints run).
    summary = run(LabelJob(output=output, input=manifest, gt=str(gt), preset="demo",
                           cam_checkpoint=trained_checkpoints["cam"],
                           affinity_checkpoint=trained_checkpoints["affinity"]))

    shards = read_tables(join(output, "shards")).to_pylist()
    errors = read_tables(join(output, "errors")).to_pylist()
    labeled = sorted(r["image_id"] for r in shards)
    assert labeled == sorted([f"syn_{i:06d}" for i in range(10)] + ["big", "cmyk"])
    assert sorted(u.rsplit("/", 1)[-1][:-4] for u in list_files(join(output, "labels"), ".png")) == labeled
    reasons = {(r["image_id"], r["stage"], r["error"]): r["message"] for r in errors}
    assert sorted(reasons) == sorted([
        ("corrupt", "read", "decode"), ("gone", "read", "missing"), ("empty", "read", "decode"),
        ("tiny", "read", "decode"), ("syn_000000", "manifest", "duplicate_id"),
        ("../escape", "manifest", "bad_id"), ("unknown", "manifest", "unknown_tag")])
    assert all(reasons.values()), "every error row says why"
    assert "truncated" in reasons[("corrupt", "read", "decode")]
    assert "too small" in reasons[("tiny", "read", "decode")]
    assert len(shards) + len(errors) == len(rows), "every input row in exactly one place"

    big = next(r for r in shards if r["image_id"] == "big")
    label = decode_label_png(read_bytes(join(output, "labels", "big.png")))
    assert label.shape == (320, big_size[0]) == (big["height"], big["width"])
    assert set(np.unique(label).tolist()) <= set(range(len(CLASS_NAMES) + 1))
    assert not any("escape" in name for _, _, files in os.walk(tmp_path) for name in files)
    counts = json.loads(read_bytes(join(output, "run.json")))["counts"]
    assert counts["input_rows"] == len(rows) and counts["labeled"] == 12 and counts["errors"] == 7
    assert summary["metrics_full"]["images"] == 12, "the large image is scored at its own size"
