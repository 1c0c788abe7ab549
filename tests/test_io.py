"""psa_ray.io: storage (local and moto S3), image decoding, palette PNGs, manifests, VOC folders."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from psa_ray.io import storage
from psa_ray.io.images import ImageDecodeError, decode_image, encode_png
from psa_ray.io.classes import write_classes
from psa_ray.io.manifest_writer import write_manifest
from psa_ray.io.rows import ERROR_SCHEMA, CorpusRow, ManifestError, RowError
from psa_ray.io.inputs import read_corpus
from psa_ray.io.palette import VOC_PALETTE, colorize, decode_label_png, encode_label_png
from psa_ray.io.storage import RetryPolicy, exists, join, list_files, read_bytes, remove_tree, write_bytes
from psa_ray.io.redact import redact

# --------------------------------------------------------------------------- storage


def test_join_keeps_schemes_and_single_slashes():
    assert join("s3://bkt", "a", "b.png") == "s3://bkt/a/b.png"
    assert join("s3://bkt/out/", "/labels/", "x.png") == "s3://bkt/out/labels/x.png"
    assert join("/data", "x") == "/data/x"
    assert join("rel/dir", "x") == "rel/dir/x"


def _check_round_trip(base: str) -> None:
    """write/read/exists/list/delete under base (a local folder or an s3:// prefix)."""
    write_bytes(join(base, "d", "b.png"), b"png-b")
    write_bytes(join(base, "d", "sub", "a.png"), b"png-a")
    write_bytes(join(base, "d", "c.txt"), b"text")
    write_bytes(join(base, "d", "b.png"), b"png-b2")  # replaces
    assert read_bytes(join(base, "d", "b.png")) == b"png-b2"
    assert exists(join(base, "d", "c.txt")) and exists(join(base, "d"))
    assert not exists(join(base, "d", "nope.txt"))
    assert list_files(join(base, "d"), suffix=".png") == [join(base, "d", "b.png"),
                                                         join(base, "d", "sub", "a.png")]
    assert list_files(join(base, "d")) == sorted([join(base, "d", "b.png"), join(base, "d", "c.txt"),
                                                  join(base, "d", "sub", "a.png")])
    assert list_files(join(base, "missing")) == []
    remove_tree(join(base, "d", "c.txt"))
    assert not exists(join(base, "d", "c.txt"))
    with pytest.raises(FileNotFoundError):
        read_bytes(join(base, "d", "c.txt"))


def test_local_round_trip_leaves_no_temp_files(tmp_path):
    _check_round_trip(str(tmp_path))
    names = sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                   for d, _, files in os.walk(tmp_path) for f in files)
    assert names == ["d/b.png", "d/sub/a.png"]


def test_local_relative_paths_list_as_joined(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_bytes("out/labels/x.png", b"x")
    assert list_files("out/labels", ".png") == [join("out/labels", "x.png")]
    assert (tmp_path / "out" / "labels" / "x.png").read_bytes() == b"x"


def test_failed_local_write_keeps_old_content_and_no_temp(tmp_path):
    target = str(tmp_path / "f.bin")
    write_bytes(target, b"old")
    with pytest.raises(TypeError):
        write_bytes(target, object())  # fails while writing the temp file
    assert read_bytes(target) == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_s3_round_trip(s3_bucket):
    _check_round_trip(join(s3_bucket, "run"))
    assert all(u.startswith(s3_bucket + "/") for u in list_files(s3_bucket))


def test_missing_s3_object_fails_fast_without_retries(s3_bucket, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(storage, "RETRY_POLICY", RetryPolicy(sleep=sleeps.append))
    with pytest.raises(FileNotFoundError):
        read_bytes(join(s3_bucket, "no", "such.png"))
    assert sleeps == []


class _FlakyFilesystem:
    """Wraps a filesystem; open_input_stream raises the given errors first, then works."""

    def __init__(self, inner, errors):
        self.inner, self.errors, self.calls = inner, list(errors), 0

    def open_input_stream(self, path):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.inner.open_input_stream(path)


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    """(uri, install(errors) -> _FlakyFilesystem, recorded sleeps) with a fast RetryPolicy."""
    uri = str(tmp_path / "obj.bin")
    write_bytes(uri, b"payload")
    sleeps: list[float] = []
    monkeypatch.setattr(storage, "RETRY_POLICY",
                        RetryPolicy(attempts=4, base_delay=0.01, max_delay=1.0, sleep=sleeps.append))
    real = storage.filesystem

    def install(errors):
        fs, _ = real(uri)
        wrapper = _FlakyFilesystem(fs, errors)
        monkeypatch.setattr(storage, "filesystem", lambda u, endpoint_url=None: (wrapper, real(u)[1]))
        return wrapper

    return uri, install, sleeps


def test_transient_errors_are_retried_with_backoff(flaky):
    uri, install, sleeps = flaky
    slow_down = "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."
    fs = install([OSError(slow_down), OSError(slow_down)])
    assert read_bytes(uri) == b"payload"
    assert fs.calls == 3
    assert len(sleeps) == 2  # base 0.01 then 0.02, each times a factor in [0.5, 1]
    assert 0.005 <= sleeps[0] <= 0.01 and 0.01 <= sleeps[1] <= 0.02


def test_permanent_error_surfaces_at_once(flaky):
    uri, install, sleeps = flaky
    fs = install([OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")])
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        read_bytes(uri)
    assert fs.calls == 1 and sleeps == []


def test_retries_give_up_after_the_policy_attempts(flaky):
    uri, install, sleeps = flaky
    fs = install([OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation")] * 10)
    with pytest.raises(OSError, match="503"):
        read_bytes(uri)
    assert fs.calls == 4 and len(sleeps) == 3
    assert not storage.is_transient(OSError("cannot read /data/img_500.png: is a directory"))


def test_redact_removes_credentials_and_keeps_paths(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjEHYaCXVzLWVhc3QtMSJHMEUCIQ")
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    path = "/data/VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg"
    sha1 = "3f786850e387550fdab836ed7e6dc881de23001b"
    text = (f"key AKIAIOSFODNN7EXAMPLE secret {secret} "
            "url ?X-Amz-Signature=abc123def&X-Amz-Security-Token=tok%2Fxyz "
            f"aws_secret_access_key = hunter2hunter2 env IQoJb3JpZ2luX2VjEHYaCXVzLWVhc3QtMSJHMEUCIQ "
            f"file {path} hash {sha1}")
    out = redact(text)
    for leaked in ("AKIAIOSFODNN7EXAMPLE", secret, "abc123def", "tok%2Fxyz", "hunter2hunter2",
                   "IQoJb3JpZ2luX2VjEHYaCXVzLWVhc3QtMSJHMEUCIQ"):
        assert leaked not in out
    assert path in out and sha1 in out


# --------------------------------------------------------------------------- images


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trip():
    rgb = _noise(40, 50)
    out = decode_image(encode_png(rgb))
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)


def test_grey_rgba_and_palette_become_rgb():
    grey = _noise(36, 48)[:, :, 0]
    assert np.array_equal(decode_image(_encoded(Image.fromarray(grey), "PNG")),
                          np.stack([grey] * 3, axis=2))
    rgba = np.concatenate([_noise(36, 48, 1), np.full((36, 48, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(decode_image(_encoded(Image.fromarray(rgba), "PNG")), rgba[:, :, :3])
    index = np.random.default_rng(2).integers(0, 4, (36, 48), dtype=np.uint8)
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 150, 0], [5, 5, 250]], np.uint8)
    paletted = Image.frombytes("P", (48, 36), index.tobytes())
    paletted.putpalette(colours.ravel().tolist())
    assert np.array_equal(decode_image(_encoded(paletted, "PNG")), colours[index])


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (48, 40), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow: red
    out = decode_image(_encoded(cmyk, "JPEG", quality=95))
    assert out.shape == (40, 48, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 8


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.zeros((32, 40), np.uint16)
    values[0, 0], values[0, 1], values[0, 2] = 65535, 32768, 257
    data = _encoded(Image.fromarray(values), "PNG")
    assert data[24] == 16  # IHDR bit depth: it really is a 16-bit PNG
    out = decode_image(data)
    assert out.shape == (32, 40, 3)
    assert out[0, 0].tolist() == [255] * 3
    assert out[0, 1].tolist() == [128] * 3  # 32768 * 255 / 65535 = 127.5
    assert out[0, 2].tolist() == [1] * 3 and out[1, 1].tolist() == [0] * 3


def test_exif_orientation_is_applied():
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)   # left half red
    stored[:, 32:] = (0, 0, 255)   # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display = stored rotated 90 degrees clockwise
    out = decode_image(_encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    expected = np.rot90(stored, k=-1)
    assert out.shape == expected.shape == (64, 40, 3)
    assert np.abs(out.astype(int) - expected).mean() < 4
    assert out[5, 20, 0] > 200 and out[58, 20, 2] > 200  # the stored left edge is on top


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_decode_errors(fmt):
    data = _encoded(Image.fromarray(_noise(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("data, reason", [(b"", "empty"), (np.random.default_rng(3).bytes(4096), "not an image")])
def test_non_images_are_decode_errors(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_tiny_images_are_rejected_unless_min_side_allows():
    data = encode_png(_noise(16, 16))
    with pytest.raises(ImageDecodeError, match="too small"):
        decode_image(data)
    assert decode_image(data, min_side=8).shape == (16, 16, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a single tiny data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png_header_only(5000, 4000), max_pixels=1_000_000)
    assert issubclass(ImageDecodeError, ValueError)


# --------------------------------------------------------------------------- palette


def test_voc_palette_known_colours():
    rgb = np.asarray(VOC_PALETTE).reshape(256, 3)
    assert len(VOC_PALETTE) == 768
    known = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 8: (64, 0, 0),
             15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for index, colour in known.items():
        assert tuple(rgb[index]) == colour


def test_label_png_round_trip():
    values = np.array(list(range(21)) + [255], np.uint8)
    label = np.resize(values, (33, 37))
    data = encode_label_png(label)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P" and image.getpalette()[3:6] == [128, 0, 0]
    assert np.array_equal(decode_label_png(data), label)
    assert set(np.unique(decode_label_png(data)).tolist()) == set(values.tolist())


def test_grey_label_png_is_read_by_value_and_rgb_is_refused():
    label = np.resize(np.array([0, 3, 255], np.uint8), (8, 9))
    assert np.array_equal(decode_label_png(_encoded(Image.fromarray(label), "PNG")), label)
    with pytest.raises(ImageDecodeError, match="mode RGB"):
        decode_label_png(encode_png(_noise(8, 8)))


def test_colorize():
    out = colorize(np.array([[0, 1], [15, 255]], np.uint8))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out.tolist() == [[[0, 0, 0], [128, 0, 0]], [[192, 128, 128], [224, 224, 192]]]


# --------------------------------------------------------------------------- manifests

CLASSES = ["cat", "dog", "bird"]
# (image_id, image, tags, expected error code or None)
CASES = [
    ("a", "images/a.png", ["cat"], None),
    ("b", "/abs/b.png", ["dog", "bird"], None),
    ("c", "s3://bkt/c.png", ["bird"], None),
    ("a", "images/a2.png", ["cat"], "duplicate_id"),
    ("x/y", "images/x.png", ["cat"], "bad_id"),
    ("x\\y", "images/x.png", ["cat"], "bad_id"),
    ("..x", "images/x.png", ["cat"], "bad_id"),
    ("", "images/x.png", ["cat"], "bad_id"),
    ("nul\x00", "images/x.png", ["cat"], "bad_id"),
    ("d", "images/d.png", ["cat", "unicorn"], "unknown_tag"),
    ("e", "images/e.png", [], "no_tags"),
    ("f", "", ["cat"], "missing_image"),
]


def _write_by_hand(path, fmt: str, cases=CASES) -> None:
    """The manifest written without write_manifest, the way a user would."""
    if fmt == "parquet":
        pq.write_table(pa.table({"image_id": [c[0] for c in cases], "image": [c[1] for c in cases],
                                 "tags": pa.array([c[2] for c in cases], pa.list_(pa.string()))}), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"image_id": c[0], "image": c[1], "tags": c[2]}) + "\n"
                                for c in cases))
    else:
        path.write_text("image_id,image,tags\n" + "".join(f'"{c[0]}",{c[1]},{"|".join(c[2])}\n'
                                                          for c in cases))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_manifest_rows_paths_and_errors(tmp_path, fmt):
    (tmp_path / "classes.txt").write_text("cat\ndog\n\nbird\n")
    _write_by_hand(tmp_path / f"manifest.{fmt}", fmt)
    corpus, errors = read_corpus(str(tmp_path / f"manifest.{fmt}"))
    assert corpus.class_names == CLASSES
    assert [(r.image_id, r.image, r.tags) for r in corpus.rows] == [
        ("a", str(tmp_path / "images" / "a.png"), ["cat"]),
        ("b", "/abs/b.png", ["dog", "bird"]),
        ("c", "s3://bkt/c.png", ["bird"]),
    ]
    assert corpus.tag_vector(corpus.rows[1]).tolist() == [0.0, 1.0, 1.0]
    assert corpus.tag_vector(corpus.rows[1]).dtype == np.float32
    assert [(e.image_id, e.error, e.stage) for e in errors] == [
        (c[0], c[3], "manifest") for c in CASES if c[3]]
    assert all(e.message for e in errors)
    table = pa.Table.from_pylist([e.to_dict() for e in errors], schema=ERROR_SCHEMA)
    assert table.num_rows == 9 and table.column_names == ["image_id", "image", "stage", "error", "message"]


def test_relative_manifest_path_resolves_images_to_absolute(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir()
    _write_by_hand(tmp_path / "c" / "m.csv", "csv", CASES[:1])
    monkeypatch.chdir(tmp_path)
    corpus, _ = read_corpus("c/m.csv", classes="cat,dog")
    assert corpus.rows[0].image == str(tmp_path / "c" / "images" / "a.png")
    assert corpus.class_names == ["cat", "dog"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_write_manifest_round_trip_on_s3(s3_bucket, fmt):
    rows = [CorpusRow("img1", "images/img1.png", ["cat", "dog"]), CorpusRow("img2", "../other/2.jpg", ["bird"])]
    uri = join(s3_bucket, "corpus", f"manifest.{fmt}")
    write_manifest(rows, uri)
    write_classes(CLASSES, join(s3_bucket, "corpus", "classes.txt"))
    corpus, errors = read_corpus(uri)
    assert errors == [] and corpus.class_names == CLASSES
    assert [(r.image_id, r.image, r.tags) for r in corpus.rows] == [
        ("img1", f"{s3_bucket}/corpus/images/img1.png", ["cat", "dog"]),
        ("img2", f"{s3_bucket}/other/2.jpg", ["bird"]),
    ]


def test_classes_from_a_file_option(tmp_path):
    _write_by_hand(tmp_path / "m.csv", "csv", CASES[:1])
    (tmp_path / "names.txt").write_text("  cat \n\nowl\n")
    corpus, _ = read_corpus(str(tmp_path / "m.csv"), classes=str(tmp_path / "names.txt"))
    assert corpus.class_names == ["cat", "owl"]


def _manifest_error(tmp_path, name: str, content: bytes | None, classes="cat,dog") -> str:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_corpus(str(tmp_path / name), classes=classes)
    message = str(info.value)
    assert name in message, message
    return message


def test_manifest_level_errors(tmp_path):
    parquet = io.BytesIO()
    pq.write_table(pa.table({"image_id": [1], "image": ["a.png"], "tags": [["cat"]]}), parquet)
    tags_as_string = io.BytesIO()
    pq.write_table(pa.table({"image_id": ["a"], "image": ["a.png"], "tags": ["cat"]}), tags_as_string)
    assert "not found" in _manifest_error(tmp_path, "missing.csv", None)
    assert "neither a manifest" in _manifest_error(tmp_path, "list.txt", b"a\n")
    assert "lacks required column(s) tags" in _manifest_error(tmp_path, "m1.csv", b"image_id,image\na,a.png\n")
    assert "lacks required column(s) image" in _manifest_error(
        tmp_path, "m2.jsonl", b'{"image_id": "a", "tags": ["cat"]}\n')
    assert "image_id must be string" in _manifest_error(tmp_path, "m3.parquet", parquet.getvalue())
    assert "tags must be list<string>" in _manifest_error(tmp_path, "m4.parquet", tags_as_string.getvalue())
    assert "not a readable Parquet" in _manifest_error(tmp_path, "m5.parquet", b"garbage")
    assert "no rows" in _manifest_error(tmp_path, "m6.csv", b"image_id,image,tags\n")
    assert "all 1 rows" in _manifest_error(tmp_path, "m7.csv", b"image_id,image,tags\na,a.png,owl\n")
    good = b"image_id,image,tags\na,a.png,cat\n"
    assert "no class names" in _manifest_error(tmp_path, "m8.csv", good, classes=None)
    message = _manifest_error(tmp_path, "m9.csv", good, classes=str(tmp_path / "nope.txt"))
    assert "classes file" in message and f"not found: {tmp_path / 'nope.txt'}" in message
    assert "'background'" in _manifest_error(tmp_path, "m10.csv", good, classes="background,cat")
    assert "duplicate class names" in _manifest_error(tmp_path, "m11.csv", good, classes="cat,cat")


def test_bad_jsonl_line_is_a_row_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image_id": "a", "image": "a.png", "tags": ["cat"]}\n'
                                      "not json\n"
                                      '{"image_id": "b", "image": "b.png", "tags": "cat"}\n')
    corpus, errors = read_corpus(str(tmp_path / "m.jsonl"), classes=["cat"])
    assert [r.image_id for r in corpus.rows] == ["a"]
    assert [(e.error, e.message.split(" ")[1]) for e in errors] == [("bad_row", "2"), ("bad_tags", "3:")]
    assert isinstance(errors[0], RowError)


# --------------------------------------------------------------------------- PASCAL VOC


def _voc_annotation(*names: str) -> str:
    objects = "".join(f"<object><name>{n}</name><difficult>0</difficult>"
                      f"<part><name>head</name></part></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n2007_000040\n")
    (root / "Annotations").mkdir()
    (root / "Annotations" / "2007_000032.xml").write_text(_voc_annotation("aeroplane", "aeroplane", "person"))
    (root / "Annotations" / "2007_000039.xml").write_text(_voc_annotation("tvmonitor"))
    (root / "SegmentationClass").mkdir()
    (root / "SegmentationClass" / "2007_000032.png").write_bytes(encode_label_png(np.zeros((4, 4), np.uint8)))
    return root


def test_voc_folder(voc):
    voc_classes = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                   "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor"]
    for uri in (str(voc), str(voc.parent)):
        corpus, errors = read_corpus(uri)
        assert errors == [] and corpus.class_names == voc_classes
        assert [(r.image_id, r.image, r.tags) for r in corpus.rows] == [
            ("2007_000032", str(voc / "JPEGImages" / "2007_000032.jpg"), ["aeroplane", "person"]),
            ("2007_000039", str(voc / "JPEGImages" / "2007_000039.jpg"), ["tvmonitor"]),
        ]
        assert np.flatnonzero(corpus.tag_vector(corpus.rows[0])).tolist() == [0, 14]


def test_voc_val_split_reports_missing_annotation(voc):
    corpus, errors = read_corpus(str(voc), split="val")
    assert [r.image_id for r in corpus.rows] == ["2007_000039"]
    assert [(e.image_id, e.error) for e in errors] == [("2007_000040", "missing_annotation")]
