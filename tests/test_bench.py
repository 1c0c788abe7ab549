"""The benchmarks run end to end in --quick mode and write complete JSON (no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from psa_ray.ops.random_walk import random_walk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, REPO)

from bench.pipeline import contention_warnings  # noqa: E402  (bench/ is a folder of scripts)
from bench.random_walk import dense_walk, walk_inputs  # noqa: E402
from bench.review_score import ranks, score_run, spearman  # noqa: E402


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick", *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("t", [4, 256])
def test_dense_baseline_is_the_same_walk(t: int) -> None:
    """The reference's dense formulation (column-normalised T, squarings, maps as rows) equals
    psa_ray's T^t with T = D^-1 W in float64."""
    affinities, cams = walk_inputs(9)
    expected = random_walk(affinities.double(), cams.double(), 8.0, t)
    torch.testing.assert_close(dense_walk(affinities.double(), cams.double(), 8.0, t), expected,
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="power of two"):
        dense_walk(affinities, cams, 8.0, 100)


def test_pipeline_bench_warns_when_threads_fought_other_load() -> None:
    """The sequential loop's two runs (torch's threads, then 1 thread): a warning only when the
    default threads ran far slower than one."""
    assert contention_warnings([{"images_per_s": 10.0}, {"images_per_s": 9.0}]) == []
    assert contention_warnings([{"images_per_s": 10.0}]) == []
    [warning] = contention_warnings([{"images_per_s": 5.0}, {"images_per_s": 10.0}])
    assert "2.0x slower" in warning and "idle machine" in warning


def test_random_walk_bench_quick(tmp_path) -> None:
    output = tmp_path / "random_walk.json"
    stdout = _run("random_walk.py", "--output", str(output))
    result = json.loads(output.read_text())
    assert result["quick"] is True
    assert {"cpu_model", "cores_usable", "ram_gib", "torch", "numpy", "torch_threads"} <= set(result["machine"])
    rows = {row["grid"]: row for row in result["rows"]}
    assert set(rows) == {"16x16", "24x24"}
    for row in rows.values():
        psa = row["psa_ray"]
        assert len(psa["seconds"]) == psa["repeats"] and psa["median_seconds"] > 0
        assert psa["peak_rss_mib"] >= psa["extra_mib"] >= 0
    both = rows["16x16"]
    assert both["dense"]["median_seconds"] > 0 and both["dense_over_psa_ray_seconds"] > 0
    assert both["max_rel_error"] < 1e-4 and both["argmax_agreement"] > 0.99  # float32, t = 256
    assert rows["24x24"]["dense"]["skipped"] == "psa_ray-only grid"
    assert "| 16x16 |" in stdout


@pytest.mark.slow
def test_pipeline_bench_quick(tmp_path) -> None:
    output = tmp_path / "pipeline.json"
    stdout = _run("pipeline.py", "--images", "3", "--output", str(output))
    result = json.loads(output.read_text())
    assert result["quick"] is True and result["setup"]["images"] == 3 and isinstance(result["warnings"], list)
    [sequential] = result["sequential"]
    assert sequential["labeled"] == 3, sequential.get("stderr_tail", sequential)
    assert sequential["torch_threads"] == torch.get_num_threads()
    assert {"load_networks", "cam", "walk", "refine", "write"} <= set(sequential["stage_seconds"])
    bound = result["parallel_loops"]
    assert bound["labeled"] == 3 and bound["processes"] == os.cpu_count(), bound
    chained, two_pools = result["ray"]  # this machine has no GPU: both layouts run
    for ray_run, layout, actor in ((chained, "chained", "StageChain"), (two_pools, "two pools", "RefineActor")):
        assert ray_run["cpus"] == 2 and ray_run["layout"] == layout
        assert ray_run["labeled"] == 3 and ray_run["error_rows"] == 0, ray_run.get("first_errors", ray_run)
        assert ray_run["ray_over_sequential"] > 0 and ray_run["steady_images_per_s"] > 0
        assert any(line.startswith("Operator") and actor in line for line in ray_run["ray_data_stats"])
        assert f"| ray, 2 CPU, {layout} |" in stdout


def test_spearman_of_ranks_with_ties() -> None:
    assert ranks(np.array([3.0, 1.0, 2.0, 1.0])).tolist() == [4.0, 1.5, 3.0, 1.5]
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)


@pytest.mark.slow
def test_review_score_bench_scores_a_finished_run(quick_job) -> None:
    """bench/review_score.py's scoring of conftest's quick job (1 epoch: too poor a run for the
    score's correlation to mean much, see bench/README.md for the default run): every labeled
    image scored against its ground truth, a score per image from shards/."""
    job, summary = quick_job
    result = score_run(job.output, job.gt)
    assert result["images"] == summary["counts"]["labeled"] == 40
    assert result["spearman"] is None or -1.0 <= result["spearman"] <= 1.0
    assert 0.0 <= result["score_quantiles"]["p10"] <= result["score_quantiles"]["p90"] <= 1.0
    assert 0.0 < result["miou_all"] < 1.0
