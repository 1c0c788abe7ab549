"""Benchmark: psa_ray's sparse Chebyshev random walk against the reference's dense walk.

Both walk the same affinities (random smooth features through `feature_affinities`, radius 5)
with beta 8 and t 256, on 21 class maps of one image (batch 1), in float32:

- psa_ray: `psa_ray.ops.random_walk.random_walk` (sparse CSR T, Chebyshev expansion of T^t);
- dense: the formulation of the reference (jiwoon-ahn/psa, infer_aff.py), written here: the dense
  (hw) x (hw) W with unit diagonal, W^beta element-wise, T = W^beta with columns normalised,
  log2(t) = 8 squarings of T, and the class maps as rows times T^t. In-place where it can be
  (at most two (hw)^2 matrices live), which is kinder to dense than the reference's code.

Each (method, grid) runs in a fresh subprocess: the median of a few repeats gives the seconds,
and Linux's peak-RSS counter, reset before each call, gives the peak memory (`machine.PeakRss`).
Process CPU seconds are kept beside wall seconds, and the 1-minute load average beside each
row: on a shared machine the wall time of torch's OpenMP threads is far from stable. Dense is
skipped where its estimate (two (hw)^2 float32 matrices; 8 * 2 (hw)^3 flops at the best rate
seen in the dense runs so far) exceeds MAX_DENSE_GIB or MAX_DENSE_SECONDS.

    python bench/random_walk.py            # full grids -> bench/results/random_walk.json
    python bench/random_walk.py --quick    # tiny grids, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for bench.*

import torch
import torch.nn.functional as F

from bench.machine import PeakRss, describe_machine
from psa_ray.ops.affinity import feature_affinities, pair_offsets, pair_slices
from psa_ray.ops.random_walk import radius_for_pairs, random_walk

RADIUS, BETA, STEPS, CLASSES, FEATURE_DIM = 5, 8.0, 256, 21, 32
BOTH_GRIDS, PSA_RAY_ONLY_GRIDS, REPEATS = (32, 48, 56, 64, 96, 128), (160, 192, 256), 3
QUICK_BOTH_GRIDS, QUICK_PSA_RAY_ONLY_GRIDS, QUICK_REPEATS = (16,), (24,), 2
MAX_DENSE_GIB, MAX_DENSE_SECONDS = 10.0, 300.0
DENSE_SECONDS_PER_GRID = 120.0   # fewer dense repeats where one run is long
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "random_walk.json"


def walk_inputs(side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinities [1,K,side,side] and CAMs [1,21,side,side] (background first), float32.

    Features: D=32 channels of coarse Gaussian noise (one value per 8x8 cell) bilinearly
    upsampled, plus fine noise: smooth regions, so affinities run from ~0.5 (1st percentile,
    unlike pixels) to ~0.9 (99th, close pixels of one region), ~0.006..0.4 after beta = 8. CAMs:
    20 smooth maps in (0, 1) and the reference's background (1 - max)^16.
    """
    generator = torch.Generator().manual_seed(seed)
    cells = max(2, side // 8)

    def smooth(channels: int) -> torch.Tensor:
        coarse = torch.randn(1, channels, cells, cells, generator=generator)
        return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)

    features = smooth(FEATURE_DIM) + 0.1 * torch.randn(1, FEATURE_DIM, side, side, generator=generator)
    affinities = feature_affinities(features, RADIUS)
    foreground = torch.sigmoid(3.0 * smooth(CLASSES - 1))
    background = (1.0 - foreground.amax(dim=1, keepdim=True)) ** 16
    return affinities, torch.cat([background, foreground], dim=1)


def dense_walk(affinities: torch.Tensor, cams: torch.Tensor, beta: float, t: int) -> torch.Tensor:
    """The reference's dense walk of one image: affinities [1,K,h,w], cams [1,C,h,w] -> [1,C,h,w].

    Needs t a power of two (the reference's 2^logt) and holds (hw) x (hw) matrices.
    """
    steps = round(math.log2(t))
    if 2 ** steps != t:
        raise ValueError(f"the dense walk squares T, so t must be a power of two, got {t}")
    _, num_pairs, height, width = affinities.shape
    size = height * width
    pixel = torch.arange(size).view(height, width)
    weights = torch.eye(size, dtype=cams.dtype)
    for k, (dy, dx) in enumerate(pair_offsets(radius_for_pairs(num_pairs))):
        (rows_i, cols_i), (rows_j, cols_j) = pair_slices(dy, dx, height, width)
        first, second = pixel[rows_i, cols_i].flatten(), pixel[rows_j, cols_j].flatten()
        value = affinities[0, k, rows_i, cols_i].flatten().to(cams.dtype)
        weights[first, second] = value
        weights[second, first] = value
    weights.pow_(beta)
    weights.div_(weights.sum(dim=0, keepdim=True))  # T: each column sums to 1
    for _ in range(steps):
        weights = weights @ weights
    return (cams.reshape(cams.shape[1], size) @ weights).reshape(cams.shape)


def measure(method: str, side: int, repeats: int, save: str) -> dict[str, Any]:
    """Time `repeats` calls of one method on one grid in this process; save the last output."""
    affinities, cams = walk_inputs(side)
    if method == "psa_ray":
        def call() -> torch.Tensor:
            return random_walk(affinities, cams, BETA, STEPS)
    else:
        def call() -> torch.Tensor:
            return dense_walk(affinities, cams, BETA, STEPS)
    seconds, cpu_seconds, peaks, extras = [], [], [], []
    walked = None
    for _ in range(repeats):
        walked = None
        with PeakRss() as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            walked = call()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        peaks.append(memory.peak_mib)
        extras.append(memory.extra_mib)
    torch.save(walked, save)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mib": max(peaks),
            "extra_mib": max(extras)}


def measure_in_subprocess(method: str, side: int, repeats: int, folder: str,
                          timeout: float) -> dict[str, Any]:
    """`measure` in a fresh interpreter; adds the median seconds and the path of the output."""
    save = str(Path(folder) / f"{method}_{side}.pt")
    command = [sys.executable, __file__, "--measure", method, "--side", str(side),
               "--repeats", str(repeats), "--save", save]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{method} on {side}x{side} failed:\n{e.stderr[-3000:]}") from e
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "median_seconds": statistics.median(result["seconds"]),
            "median_cpu_seconds": statistics.median(result["cpu_seconds"]), "repeats": repeats, "output": save}


def dense_flops(side: int) -> float:
    """Floating point operations of the dense walk's log2(t) squarings of a (hw) x (hw) matrix."""
    size = side * side
    return math.log2(STEPS) * 2.0 * size**3


def dense_estimate(side: int, best_flops_per_s: float | None) -> dict[str, float | None]:
    """Dense memory (two (hw)^2 float32 matrices) and time (its flops at the best rate seen)."""
    size = side * side
    seconds = None if best_flops_per_s is None else dense_flops(side) / best_flops_per_s
    return {"estimated_memory_gib": round(2 * size * size * 4 / 2**30, 2),
            "estimated_seconds": None if seconds is None else round(seconds, 1)}


def agreement(walked: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """max over class maps of max|walked - reference| / max|reference|, and argmax agreement."""
    error = (walked - reference).abs().amax(dim=(2, 3)) / reference.abs().amax(dim=(2, 3))
    same = (walked.argmax(dim=1) == reference.argmax(dim=1)).double().mean()
    return {"max_rel_error": float(error.max()), "argmax_agreement": float(same)}


def run_benchmark(both_grids: tuple[int, ...], psa_ray_only_grids: tuple[int, ...],
                  repeats: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    best_flops_per_s: float | None = None
    with tempfile.TemporaryDirectory() as folder:
        for side in (*both_grids, *psa_ray_only_grids):
            row: dict[str, Any] = {"grid": f"{side}x{side}", "pixels": side * side}
            psa = measure_in_subprocess("psa_ray", side, repeats, folder, timeout=1800)
            row["psa_ray"] = psa
            estimate = dense_estimate(side, best_flops_per_s)
            seconds_estimate = estimate["estimated_seconds"]
            if side not in both_grids:
                dense = {"skipped": "psa_ray-only grid", **estimate}
            elif estimate["estimated_memory_gib"] > MAX_DENSE_GIB:
                dense = {"skipped": f"estimated memory > {MAX_DENSE_GIB} GiB", **estimate}
            elif seconds_estimate is not None and seconds_estimate > MAX_DENSE_SECONDS:
                dense = {"skipped": f"estimated time > {MAX_DENSE_SECONDS:.0f} s", **estimate}
            else:
                dense_repeats = repeats if seconds_estimate is None else \
                    max(1, min(repeats, int(DENSE_SECONDS_PER_GRID / max(seconds_estimate, 1e-3))))
                dense = {**measure_in_subprocess("dense", side, dense_repeats, folder,
                                                 timeout=3 * MAX_DENSE_SECONDS * dense_repeats), **estimate}
            row["dense"] = dense
            row["load_average_1min"] = round(os.getloadavg()[0], 2)
            if "median_seconds" in dense:
                dense["gflops_per_s"] = dense_flops(side) / min(dense["seconds"]) / 1e9
                best_flops_per_s = max(best_flops_per_s or 0.0, dense["gflops_per_s"] * 1e9)
            if "median_seconds" in dense and "median_seconds" in psa:
                row["dense_over_psa_ray_seconds"] = dense["median_seconds"] / psa["median_seconds"]
                row["dense_over_psa_ray_extra_memory"] = dense["extra_mib"] / max(psa["extra_mib"], 1e-3)
                row.update(agreement(torch.load(psa["output"], map_location="cpu"),
                                     torch.load(dense["output"], map_location="cpu")))
            for result in (psa, dense):
                result.pop("output", None)
            rows.append(row)
            print(table_line(row), flush=True)
    return {
        "description": __doc__.split("\n\n")[0],
        "setup": {"radius": RADIUS, "beta": BETA, "t": STEPS, "classes": CLASSES, "batch": 1,
                  "dtype": "float32", "feature_dim": FEATURE_DIM, "repeats": repeats,
                  "max_dense_gib": MAX_DENSE_GIB, "max_dense_seconds": MAX_DENSE_SECONDS},
        "seconds": "wall seconds of one call, median of the repeats (psa_ray: transition matrix + "
                   "walk; dense: building W + powers + squarings + product); cpu_seconds: the "
                   "process's CPU time for the same calls (all threads)",
        "memory_method": PeakRss.MEMORY_METHOD,
        "agreement": "max_rel_error: max over the 21 maps of max|psa_ray - dense| / max|dense|; "
                     "argmax_agreement: fraction of pixels with the same argmax class",
        "machine": describe_machine(),
        "rows": rows,
    }


TABLE_HEADER = ("| grid | psa_ray s | dense s | dense/psa_ray | psa_ray peak (extra) MiB "
                "| dense peak (extra) MiB | max rel err | load 1 min |\n|---|---|---|---|---|---|---|---|")


def table_line(row: dict[str, Any]) -> str:
    def cells(result: dict[str, Any]) -> tuple[str, str]:
        if "median_seconds" not in result:
            return f"skipped ({result['skipped']})", "-"
        return (f"{result['median_seconds']:.3f}",
                f"{result['peak_rss_mib']:.0f} ({result['extra_mib']:.0f})")
    psa_seconds, psa_memory = cells(row["psa_ray"])
    dense_seconds, dense_memory = cells(row["dense"])
    ratio = f"{row['dense_over_psa_ray_seconds']:.1f}x" if "dense_over_psa_ray_seconds" in row else "-"
    error = f"{row['max_rel_error']:.1e}" if "max_rel_error" in row else "-"
    return (f"| {row['grid']} | {psa_seconds} | {dense_seconds} | {ratio} | {psa_memory} | {dense_memory} "
            f"| {error} | {row['load_average_1min']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny grids only (a smoke run)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the JSON goes")
    parser.add_argument("--measure", choices=("psa_ray", "dense"), help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # one measurement, in the subprocess that measure_in_subprocess started
        print(json.dumps(measure(args.measure, args.side, args.repeats, args.save)))
        return
    print(TABLE_HEADER, flush=True)
    if args.quick:
        result = run_benchmark(QUICK_BOTH_GRIDS, QUICK_PSA_RAY_ONLY_GRIDS, QUICK_REPEATS)
    else:
        result = run_benchmark(BOTH_GRIDS, PSA_RAY_ONLY_GRIDS, REPEATS)
    result["quick"] = args.quick
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
