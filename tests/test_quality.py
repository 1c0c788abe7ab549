"""Label statistics without ground truth, and the warning for a class that vanishes from its images."""
from __future__ import annotations

import numpy as np
import pytest

from psa_ray.io.storage import join
from psa_ray.ops.quality import edge_band, interior_share, label_agreement, label_quality
import pyarrow as pa

from psa_ray.pipeline.quality import label_statistics, review_rows, seed_statistics
from psa_ray.pipeline.quality_rules import (
    AREA_HIGH_WARNING, AREA_WARNING, MIN_TAGGED, VANISHED_WARNING, quality_warnings)
from psa_ray.pipeline.report import quality_sections, text_report
from psa_ray.pipeline.layout import OutputLayout
from psa_ray.pipeline.writers import IndexSink, shard_table, write_table

NAMES = ["cat", "dog", "bird"]


def _row(i: int, tags: str, fractions: list[float], confidence: float) -> dict:
    return {"image_id": f"r{i}", "image": f"r{i}.png", "tag_names": tags, "height": 4, "width": 4,
            "label_png": b"", "class_fractions": fractions, "mean_confidence": confidence}


def test_statistics_count_vanished_classes_and_warn_only_for_often_vanished_ones(ray_cluster, tmp_path):
    rows = ([_row(i, "cat", [0.5, 0.5, 0, 0], 0.925) for i in range(8)]            # cat found
            + [_row(8 + i, "cat|dog", [0.75, 0, 0.25, 0], 0.625) for i in range(4)]  # cat vanished
            + [_row(12 + i, "dog", [0.5, 0, 0.5, 0], 0.825) for i in range(8)]
            + [_row(20 + i, "bird", [1.0, 0, 0, 0], 0.325) for i in range(3)])       # too few to judge
    output = str(tmp_path)
    write_table(join(output, "shards", "a.parquet"), shard_table(rows[:10], "run"))
    write_table(join(output, "shards", "b.parquet"), shard_table(rows[10:], "run"))

    stats = label_statistics(output, NAMES)
    assert stats["images"] == 23
    cat, dog, bird = (stats["classes"][n] for n in NAMES)
    assert (cat["tagged_images"], cat["vanished"]) == (12, pytest.approx(4 / 12, abs=1e-4))
    assert cat["area_share"] == pytest.approx(8 * 0.5 / 12, abs=1e-4)
    assert (dog["tagged_images"], dog["vanished"]) == (12, 0.0)
    assert dog["area_share"] == pytest.approx((4 * 0.25 + 8 * 0.5) / 12, abs=1e-4)
    assert (bird["tagged_images"], bird["vanished"]) == (3, 1.0)
    assert all(c["untagged_with_pixels"] == 0 for c in stats["classes"].values())
    assert sum(stats["confidence"]["histogram"]) == 23
    # quantiles at their bin's upper edge (bins of 0.01)
    assert stats["confidence"]["quantiles"] == {"p10": 0.33, "p50": 0.83, "p90": 0.93}
    assert stats["background_share"] == pytest.approx(np.mean([r["class_fractions"][0] for r in rows]), abs=1e-4)

    warnings = quality_warnings(stats)
    assert len(warnings) == 1 and "'cat'" in warnings[0] and "33%" in warnings[0]
    assert "learned it poorly" in warnings[0]
    # cat had confident seeds in all its images: the walk lost it, and the warning says so
    seeds = {"classes": {n: {"no_seed": 0.0} for n in NAMES}}
    [walk_lost] = quality_warnings(stats, seeds)
    assert "'cat'" in walk_lost and "random walk lost it" in walk_lost
    printed = text_report(quality_sections({"label_statistics": stats}, None))  # what the job prints
    assert "cat" in printed and "median 0.83" in printed


def test_a_class_covering_far_more_than_the_median_class_is_warned_of():
    """seed 5 of the default run: cardinal covered 3x the median class's share (final IoU 27)."""
    def stats(area: float) -> dict:
        shares = {"cardinal": area, "goldfinch": 0.19, "mallard": 0.16, "kingfisher": 0.17, "bluejay": 0.12}
        return {"classes": {n: {"tagged_images": 70, "vanished": 0.0, "area_share": a} for n, a in shares.items()}}
    [warning] = quality_warnings(stats(0.497))
    assert "'cardinal'" in warning and "49.7%" in warning and "median of 17.0%" in warning
    assert "took in the background or other classes" in warning
    assert quality_warnings(stats(0.30)) == []  # 1.8x the median: good runs showed up to 1.9x


def test_no_shards_no_statistics_no_warnings(ray_cluster, tmp_path):
    assert label_statistics(str(tmp_path), NAMES) is None
    assert seed_statistics(str(tmp_path), NAMES) is None
    assert review_rows(str(tmp_path), 5) == []
    assert quality_warnings(None) == []


def test_seed_statistics_per_class_from_the_committed_seed_index(ray_cluster, tmp_path):
    """index/seeds/ rows as IndexSink commits them: fractions (background, cat, dog, bird, ignore)."""
    rows = ([{"image_id": f"c{i}", "tag_names": "cat", "seed_fractions": [0.5, 0.25, 0, 0, 0.25], "error": ""}
             for i in range(3)]
            + [{"image_id": "cd", "tag_names": "cat|dog", "seed_fractions": [0.25, 0.5, 0, 0, 0.25], "error": ""},
               {"image_id": "bad", "tag_names": "dog", "seed_fractions": [0, 0, 0, 0, 0], "error": "Boom"}])
    sink = IndexSink(OutputLayout(str(tmp_path)).seed_index, 100, with_seed_fractions=True)
    sink.write([pa.Table.from_pylist(rows[:2]), pa.Table.from_pylist(rows[2:])], None)
    old = join(OutputLayout(str(tmp_path)).seed_index, "old.parquet")
    write_table(old, pa.table({"image_id": ["x"]}))  # no fractions

    stats = seed_statistics(str(tmp_path), NAMES)
    assert stats["images"] == 4 and stats["ignore_share"] == 0.25
    assert stats["background_share"] == pytest.approx((3 * 0.5 + 0.25) / 4, abs=1e-4)
    cat, dog, bird = (stats["classes"][n] for n in NAMES)
    assert cat == {"tagged_images": 4, "foreground_share": pytest.approx((3 * 0.25 + 0.5) / 4, abs=1e-4),
                   "no_seed": 0.0, "background_share": pytest.approx(0.4375, abs=1e-4), "ignore_share": 0.25}
    assert (dog["tagged_images"], dog["foreground_share"], dog["no_seed"]) == (1, 0.0, 1.0)
    assert bird["tagged_images"] == 0 and bird["no_seed"] is None


def test_review_rows_are_the_lowest_quality_scores_over_all_shards(ray_cluster, tmp_path):
    output = str(tmp_path)
    scores = [0.9, 0.2, 0.5, 0.05, 0.7, 0.3]
    for name, part in (("a", range(0, 3)), ("b", range(3, 6))):
        rows = [{**_row(i, "cat", [0.5, 0.5, 0, 0], 0.9), "quality": scores[i]} for i in part]
        write_table(join(output, "shards", f"{name}.parquet"), shard_table(rows, "run"))
    review = review_rows(output, 3)
    assert [(r["image_id"], round(r["quality"], 3)) for r in review] == [("r3", 0.05), ("r1", 0.2), ("r5", 0.3)]
    assert review[0]["tag_names"] == ["cat"] and review[0]["image"] == "r3.png"


@pytest.mark.slow
def test_a_job_whose_networks_trained_one_epoch_warns_of_the_classes_they_learned_poorly(quick_job):
    """conftest's quick job trains each network for one epoch on 40 images: the classes it warns
    of vanish from their images or cover far less or more than the median class, and against the
    ground truth their final IoU is indeed low."""
    job, summary = quick_job
    stats, metrics = summary["label_statistics"], summary["metrics_full"]
    # the other figures without ground truth: the CAM network's held-out tag AP, the seeds
    held_out, seeds = summary["cam_held_out"], summary["seed_statistics"]
    assert held_out["images"] >= 1 and set(held_out["ap"]) == set(stats["classes"])
    assert seeds["images"] == 40 and 0 < seeds["background_share"] < 1 and 0 < seeds["ignore_share"] < 1
    assert {n: c["tagged_images"] for n, c in seeds["classes"].items()} == \
        {n: c["tagged_images"] for n, c in stats["classes"].items()}, "the seeds cover the labeled images"
    named = {w.split("'")[1] for w in summary["warnings"]}
    assert named, f"no warning for a 1-epoch run: {stats['classes']}"
    judged = [c["area_share"] for c in stats["classes"].values() if c["tagged_images"] >= MIN_TAGGED]
    median_area = float(np.median(judged))
    for name in named:
        c = stats["classes"][name]
        ratio = c["area_share"] / median_area
        assert c["tagged_images"] >= MIN_TAGGED
        assert c["vanished"] > VANISHED_WARNING or not AREA_WARNING <= ratio <= AREA_HIGH_WARNING, (name, c)
        assert metrics["rw_crf"]["iou"][metrics["class_names"].index(name)] < 0.3, (name, c, metrics["rw_crf"])


# --------------------------------------------------------------------------- per-image quality score

def test_interior_share_counts_pixels_away_from_other_values_per_value():
    label = np.zeros((10, 10), np.uint8)
    label[:, 5:] = 1                       # two halves: columns 0-4 and 5-9
    # band 1: columns 4 and 5 touch the other value; each half keeps 4 of its 5 columns
    assert interior_share(label, 1) == pytest.approx(0.8)
    assert interior_share(label, 2) == pytest.approx(0.6)
    assert interior_share(np.zeros((6, 6), np.uint8), 3) == 1.0  # the image border is no edge
    small = np.zeros((20, 20), np.uint8)
    small[8:12, 8:12] = 2                  # a 4x4 object: all edge at band 2
    assert interior_share(small, 2) == pytest.approx((1 - (64 - 16) / 384) / 2)  # the 8x8 around it


def test_label_agreement_is_the_mean_iou_between_two_labels():
    a = np.array([[0, 0, 1, 1]])
    assert label_agreement(a, a) == 1.0
    assert label_agreement(a, np.array([[0, 1, 1, 1]])) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert label_agreement(a, np.array([[0, 0, 2, 2]])) == pytest.approx((1 + 0 + 0) / 3)


def test_label_quality_is_the_lowest_of_interior_agreement_and_tags_kept_and_band_follows_the_walk_grid():
    label = np.zeros((10, 10), np.uint8)
    label[:, 5:] = 1
    assert label_quality(label, label, 1, np.array([1])) == pytest.approx(0.8)
    walk = label.copy()
    walk[:, 5:] = 0                        # the walk saw no object: agreement (5/10 + 0) / 2
    assert label_quality(label, walk, 1, np.array([1])) == pytest.approx(0.25)
    # a tagged class with no pixel: at most the share of the tags kept
    assert label_quality(np.full((10, 10), 3, np.uint8), np.full((10, 10), 3, np.uint8), 1,
                         np.array([3, 5])) == 0.5
    assert edge_band(128, 320) == 2 and edge_band(500, 500) == 4 and edge_band(100, 1000) == 1
