"""The labeling job on a small built-in hard corpus (`--corpus hard`): it runs end to end, and the
walk never erases a tagged class that had a confident seed region in its image."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from psa_ray.io.palette import decode_label_png


@pytest.mark.slow
def test_no_tagged_class_with_a_confident_seed_ends_without_pixels(ray_cluster, tmp_path):
    from psa_ray.data.hard import CLASS_NAMES
    from psa_ray.pipeline.labeling import LabelJob, run

    output = tmp_path / "hard"
    # one epoch of weakly trained networks: the walk has every chance to wash a class out
    summary = run(LabelJob(output=str(output), corpus="hard", synthetic_images=16, epochs=1, train_workers=1,
                           scales=(1.0,), seed=2))
    assert summary["counts"]["labeled"] == 16 and summary["counts"]["errors"] == 0
    assert set(summary["metrics_full"]["class_names"][1:]) == set(CLASS_NAMES)

    seeded = kept = 0
    for row in pq.read_table(output / "corpus" / "manifest.parquet").to_pylist():
        seeds = decode_label_png((output / "seeds" / f"{row['image_id']}.png").read_bytes())
        label = decode_label_png((output / "labels" / f"{row['image_id']}.png").read_bytes())
        assert set(np.unique(label)) <= {0} | {CLASS_NAMES.index(t) + 1 for t in row["tags"]}
        for tag in row["tags"]:
            c = CLASS_NAMES.index(tag) + 1
            if (seeds == c).any():
                seeded += 1
                kept += int((label == c).any())
                assert (label == c).any(), f"{row['image_id']}: {tag} had a confident seed and no pixels"
    assert seeded > 0 and kept == seeded
