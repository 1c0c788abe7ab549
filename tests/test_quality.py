"""Label statistics without ground truth, and the warning for a class that vanishes from its images."""
from __future__ import annotations

import numpy as np
import pytest

from psa_ray.io.storage import join
from psa_ray.pipeline.quality import (
    MIN_TAGGED, VANISHED_WARNING, label_statistics, quality_warnings, statistics_table)
from psa_ray.pipeline.writers import shard_table, write_table

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
    assert "cat" in statistics_table(stats) and "median 0.83" in statistics_table(stats)


def test_no_shards_no_statistics_no_warnings(ray_cluster, tmp_path):
    assert label_statistics(str(tmp_path), NAMES) is None
    assert quality_warnings(None) == []


@pytest.mark.slow
def test_a_job_whose_networks_trained_one_epoch_warns_of_the_classes_they_learned_poorly(quick_job):
    """conftest's quick job trains each network for one epoch on 40 images: the classes it warns
    of vanish from their images, and against the ground truth their final IoU is indeed low."""
    _, summary = quick_job
    stats, metrics = summary["label_statistics"], summary["metrics_full"]
    named = {w.split("'")[1] for w in summary["warnings"]}
    assert named, f"no warning for a 1-epoch run: {stats['classes']}"
    for name in named:
        c = stats["classes"][name]
        assert c["tagged_images"] >= MIN_TAGGED and c["vanished"] > VANISHED_WARNING
        assert metrics["rw_crf"]["iou"][metrics["class_names"].index(name)] < 0.3, name
