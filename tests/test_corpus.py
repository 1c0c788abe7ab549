"""Stage 0 and the rows every stage reads: the manifest validated once through Ray Data, duplicate
ids across a sharded manifest, the training sample, and lookups against committed tables."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from psa_ray.io.keys import id_key
from psa_ray.io.rows import ManifestError
from psa_ray.io.storage import join, list_files, read_bytes
from psa_ray.pipeline.corpus import committed_keys, corpus_dataset, prepare_corpus, select
from psa_ray.pipeline.writers import read_tables

CLASSES = ["cat", "dog"]


def _shard(path, ids, images=None, tags=None) -> None:
    n = len(ids)
    pq.write_table(pa.table({"image_id": ids, "image": images or [f"{i}.png" for i in ids],
                             "tags": pa.array(tags or [["cat"]] * n, pa.list_(pa.string()))}), path)


def test_sharded_manifest_rows_errors_and_first_duplicate_kept(ray_cluster, tmp_path):
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "classes.txt").write_text("cat\ndog\n")
    _shard(manifest / "part-0.parquet", ["a", "b", "a/b", "c"], tags=[["cat"], ["owl"], ["cat"], ["dog"]])
    _shard(manifest / "part-1.parquet", ["b", " c ", "d"], images=["b1.png", "c1.png", "d.png"])
    output = str(tmp_path / "out")

    index = prepare_corpus(str(manifest), output, classes=str(manifest / "classes.txt"))
    rows = corpus_dataset(index).take_all()
    # b's first row has an unknown tag, so the first *usable* b (in part-1) keeps the id;
    # " c " (stripped: c) comes after c of part-0 and is the duplicate.
    assert sorted((r["image_id"], r["image"].rsplit("/", 1)[-1]) for r in rows) == [
        ("a", "a.png"), ("b", "b1.png"), ("c", "c.png"), ("d", "d.png")]
    assert {r["image_id"]: r["tags"].tolist() for r in rows}["c"] == [0.0, 1.0]
    errors = read_tables(join(output, "errors")).to_pylist()
    assert sorted((e["image_id"], e["error"]) for e in errors) == [
        ("a/b", "bad_id"), ("b", "unknown_tag"), ("c", "duplicate_id")]
    duplicate = next(e for e in errors if e["error"] == "duplicate_id")
    assert "part-1.parquet row 2" in duplicate["message"] and "part-0.parquet row 4" in duplicate["message"]
    assert index.num_rows == 4 and index.num_errors == 3

    # A rerun reuses rows/ (its marker) and finds the same corpus.
    again = prepare_corpus(str(manifest), output, classes=str(manifest / "classes.txt"))
    assert again == index and len(read_tables(join(output, "errors"))) == 3


def test_training_sample_is_the_smallest_id_digests(ray_cluster, tmp_path):
    ids = [f"img{i:03d}" for i in range(40)]
    _shard(tmp_path / "m.parquet", ids)
    index = prepare_corpus(str(tmp_path / "m.parquet"), str(tmp_path / "out"), classes="cat,dog", train_images=7)
    sample = sorted(r["image_id"] for r in corpus_dataset(index, sample=True).take_all())
    assert sample == sorted(sorted(ids, key=id_key)[:7])
    marker = json.loads(read_bytes(join(str(tmp_path / "out"), "rows", "_corpus.json")))
    assert marker["sample"]["size"] == 7 and "BLAKE2b" in marker["sample"]["rule"]
    # asking for another size later re-samples from rows/ without reading the manifest again
    (tmp_path / "m.parquet").unlink()
    index = prepare_corpus(str(tmp_path / "m.parquet"), str(tmp_path / "out"), classes="cat,dog", train_images=100)
    assert corpus_dataset(index, sample=True).count() == 40


def test_committed_keys_exclude_and_include_exactly_those_ids(ray_cluster, tmp_path):
    ids = [f"img{i:03d}" for i in range(30)]
    _shard(tmp_path / "m.parquet", ids)
    output = str(tmp_path / "out")
    index = prepare_corpus(str(tmp_path / "m.parquet"), output, classes="cat,dog")
    pq.write_table(pa.table({"image_id": ids[:10]}), tmp_path / "out" / "done.parquet")
    errors = tmp_path / "out" / "errs"
    errors.mkdir()
    pq.write_table(pa.table({"image_id": ["img012", "img013"], "stage": ["crf", "manifest"]}),
                   errors / "e.parquet")
    (tmp_path / "out" / "shards").mkdir()
    (tmp_path / "out" / "done.parquet").rename(tmp_path / "out" / "shards" / "done.parquet")

    done = committed_keys(join(output, "shards"), errors=str(errors))
    todo = sorted(r["image_id"] for r in corpus_dataset(index, exclude=done).take_all())
    assert todo == sorted(set(ids) - set(ids[:10]) - {"img012"}), "manifest errors are not done"
    again = sorted(r["image_id"] for r in select(corpus_dataset(index), include=done).take_all())
    assert again == sorted(ids[:10] + ["img012"])
    assert committed_keys(join(output, "nothing")) is None


def test_all_rows_rejected_stops_with_one_message_and_leaves_nothing(ray_cluster, tmp_path):
    _shard(tmp_path / "m.parquet", ["a", "b"], tags=[["owl"], ["bat"]])
    output = tmp_path / "out"
    with pytest.raises(ManifestError) as info:
        prepare_corpus(str(tmp_path / "m.parquet"), str(output), classes="cat,dog")
    assert "all 2 rows" in str(info.value) and "unknown_tag: 2" in str(info.value)
    assert not output.exists()
    assert list_files(str(output)) == []


@pytest.mark.parametrize("base", ["/data/corpus", "/", "s3://bucket/corpus", "s3://bucket/"])
def test_arrow_checks_give_the_rows_the_per_row_checks_give(tmp_path, base):
    """Stage 0 checks Parquet rows with Arrow kernels where a row needs nothing changed and with
    check_record otherwise: the table it gives equals check_record's on every row, tricky ones
    included (things to strip, paths to normalise, URIs, repeated, unknown or null tags, bad ids)."""
    from psa_ray.io.checked_rows import checked_table, read_part as _read_part
    from psa_ray.io.manifest import manifest_parts, part_records
    from psa_ray.io.rows import plain_rows

    tricky = [("ok", "a.png", ["cat"]), (" pad ", "b.png", ["cat"]), ("x", " b.png", ["cat"]),
              ("x2", "./b.png", ["cat"]), ("x3", "d/../b.png", ["dog"]), ("x4", "d//b.png", ["cat"]),
              ("x5", "/abs/b.png", ["cat"]), ("x6", "s3://other/k.png", ["cat"]),
              ("x7", "file:///abs/c.png", ["cat"]), ("x8", "d/", ["cat"]), ("x9", "d/.", ["cat"]),
              ("rep", "r.png", ["cat", "cat"]), ("both", "r.png", ["dog", "cat"]),
              ("sp", "s.png", [" cat"]), ("nul", "n.png", ["cat", None]), ("none", "n.png", []),
              ("unk", "u.png", ["owl"]), ("a/b", "ab.png", ["cat"]), ("a..b", "ab.png", ["cat"]),
              ("", "e.png", ["cat"]), ("ctl\x01", "c.png", ["cat"]), ("x" * 201, "l.png", ["cat"]),
              ("é", "é.png", ["cat"]), ("tab", "t\t.png", ["cat"]), ("q", "sp ace.png", ["dog"]),
              (None, "n.png", ["cat"]), ("noimg", None, ["cat"]), ("notags", "x.png", None)]
    rows = tricky * 3 + [(f"id{i}", f"img/{i % 7}.png", [["cat"], ["dog"], ["cat", "dog"]][i % 3])
                         for i in range(500)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_id": pa.array([r[0] for r in rows], pa.string()),
                             "image": pa.array([r[1] for r in rows], pa.string()),
                             "tags": pa.array([r[2] for r in rows], pa.list_(pa.string()))}), path,
                   row_group_size=200)
    parts = manifest_parts(str(path))
    fast = pa.concat_tables([t for part in parts for t in _read_part(part, CLASSES, base)])
    slow = pa.concat_tables([checked_table(records, CLASSES, set(CLASSES), base)
                             for part in parts for records in part_records(part, 64)])
    assert fast.num_rows == len(rows) and fast.equals(slow)
    table = pq.read_table(path)
    plain = plain_rows(table, CLASSES, base)
    assert 500 <= plain.sum() < len(rows)  # the ordinary rows took the Arrow path, the tricky ones not
    assert plain_rows(table, CLASSES, "/data/./corpus").sum() == 0  # a base that is not normal: per row
