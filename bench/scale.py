"""The cost of corpus size: what the labeling job pays before its first label, and whether stage D
keeps its pace over a long corpus.

1. `startup`: for manifests of 10k ... 10M rows that point at a few real small images (so that only
   the number of rows differs), `jobs/label_dataset.py --input M --cam-checkpoint ...
   --affinity-checkpoint ...` runs as a user runs it (a fresh process on a fresh local Ray); the
   bench reads the job process's own peak RSS (VmHWM in /proc/<pid>/status) and the time from
   its start to the first `labels/*.png`, lets it run `--after-first-label` seconds more, then
   stops it. The seconds to the first decoded image come from a second fresh process that calls
   what the job calls (`prepare_corpus`, then `decoded_dataset(corpus_dataset(...)).take(1)`).
2. `stream`: a whole stage-D run over `--stream-images` tiny images with fixed checkpoints:
   images/s in each window of 1,000 labels (from the label files' write times), shard file sizes,
   and every image in exactly one shard row.

Networks are untrained exports (bench/pipeline.py's `export_untrained`): cost does not depend on
the weights. Results: bench/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import describe_machine  # noqa: E402
from pipeline import bench_preset, export_untrained  # noqa: E402

from psa_ray.data.synthetic import CLASS_NAMES, SyntheticConfig, make_sample  # noqa: E402

DEFAULT_ROWS = (10_000, 100_000, 1_000_000, 10_000_000)
DEFAULT_OUTPUT = REPO / "bench" / "results" / "scale.json"
IMAGE_SIDE = 48
FIRST_DECODE = """
import json, sys, time
started = time.perf_counter()
import ray
from psa_ray.config import PRESETS
from psa_ray.pipeline.corpus import corpus_dataset, prepare_corpus
from psa_ray.pipeline.readers import decoded_dataset
ray.init(include_dashboard=False, log_to_driver=False)
index = prepare_corpus(sys.argv[1], sys.argv[2])
next(iter(decoded_dataset(corpus_dataset(index), num_cpus=PRESETS["demo"].pipeline.decode_cpus).iter_rows()))
print(json.dumps({"first_decoded_s": time.perf_counter() - started}))
"""


def write_images(folder: Path, count: int = 8) -> list[tuple[str, list[str]]]:
    """count small synthetic images (IMAGE_SIDE px) as PNG; (relative path, tags) each."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    config = SyntheticConfig(num_images=count, seed=0)
    out = []
    for i in range(count):
        sample = make_sample(i, config)
        name = f"images/s{i}.png"
        Image.fromarray(sample.image).resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR).save(folder / name)
        out.append((name, list(sample.tags)))
    return out


def write_manifest(folder: Path, rows: int, images: list[tuple[str, list[str]]]) -> str:
    """A Parquet manifest of `rows` distinct ids over `images`, written in 1M-row pieces."""
    path = folder / f"manifest_{rows}.parquet"
    if path.exists():
        return str(path)
    step = 1_000_000
    schema = pa.schema([("image_id", pa.string()), ("image", pa.string()), ("tags", pa.list_(pa.string()))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, step):
            ids = np.arange(start, min(rows, start + step))
            picks = ids % len(images)
            writer.write_table(pa.table({
                "image_id": pa.array([f"img{i:09d}" for i in ids]),
                "image": pa.array([images[k][0] for k in picks]),
                "tags": pa.array([images[k][1] for k in picks], pa.list_(pa.string()))}, schema=schema))
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    return str(path)


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def startup(manifest: str, rows: int, weights: dict[str, str], work: Path, after_first_label: float,
            timeout: float) -> dict[str, Any]:
    """One job run on a manifest until its first label (and after_first_label seconds more)."""
    output = work / f"out_{rows}"
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "jobs" / "label_dataset.py"), "--input", manifest, "--output", str(output),
           "--preset", "demo", "--cam-checkpoint", weights["cam"], "--affinity-checkpoint", weights["affinity"]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    labels, first_label, peak = output / "labels", None, 0.0
    while time.perf_counter() - started < timeout and proc.poll() is None:
        peak = max(peak, _vm_hwm_mib(proc.pid) or 0.0)
        if first_label is None and labels.is_dir() and any(labels.iterdir()):
            first_label = time.perf_counter() - started
        if first_label is not None and time.perf_counter() - started > first_label + after_first_label:
            break
        time.sleep(0.2)
    peak = max(peak, _vm_hwm_mib(proc.pid) or 0.0)
    labeled = len(list(labels.iterdir())) if labels.is_dir() else 0
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.rmtree(output, ignore_errors=True)

    probe_out = work / f"probe_{rows}"
    shutil.rmtree(probe_out, ignore_errors=True)
    probe = subprocess.run([sys.executable, "-c", FIRST_DECODE, manifest, str(probe_out)], env={
        **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=timeout)
    shutil.rmtree(probe_out, ignore_errors=True)
    first_decoded = (json.loads(probe.stdout.strip().splitlines()[-1])["first_decoded_s"]
                     if probe.returncode == 0 else None)
    return {"rows": rows, "first_label_s": first_label, "first_decoded_s": first_decoded,
            "driver_peak_rss_mib": round(peak, 1), "labels_when_stopped": labeled,
            "watched_s": round(time.perf_counter() - started, 1)}


def stream(images: int, source: list[tuple[str, list[str]]], folder: Path, weights: dict[str, str],
           work: Path, window: int = 1000) -> dict[str, Any]:
    """A whole stage-D run over `images` tiny images: images/s per window, shard sizes."""
    manifest = write_manifest(folder, images, source)
    output = work / "stream"
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "jobs" / "label_dataset.py"), "--input", manifest, "--output", str(output),
           "--preset", "demo", "--cam-checkpoint", weights["cam"], "--affinity-checkpoint", weights["affinity"]]
    started = time.time()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    times = np.sort([p.stat().st_mtime for p in (output / "labels").iterdir()]) - started
    windows = [{"labels": f"{i + 1}-{min(i + window, len(times))}",
                "images_per_s": round(window / (times[min(i + window, len(times)) - 1] - times[i - 1]), 2)
                if i else None} for i in range(0, len(times), window)]
    shard_rows = [pq.read_metadata(f).num_rows for f in sorted((output / "shards").iterdir())]
    ids = pq.read_table(output / "shards", columns=["image_id"]).column("image_id").to_pylist()
    result = {"images": images, "seconds": round(time.time() - started, 1), "labels": len(times),
              "windows": windows, "shard_files": len(shard_rows),
              "mean_rows_per_shard": round(float(np.mean(shard_rows)), 1) if shard_rows else 0,
              "every_image_in_one_shard_row": sorted(ids) == [f"img{i:09d}" for i in range(images)]}
    shutil.rmtree(output, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=list(DEFAULT_ROWS), help="manifest sizes for startup")
    p.add_argument("--stream-images", type=int, default=20_000, help="images of the stream run (0: skip)")
    p.add_argument("--after-first-label", type=float, default=30.0,
                   help="seconds the job runs on after its first label (its RSS is watched meanwhile)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--work", help="folder for manifests and runs (default: a temp folder)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--quick", action="store_true", help="smoke run: 2,000 rows, 300 stream images")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.stream_images, args.after_first_label = [2000], 300, 2.0
    work = Path(args.work or tempfile.mkdtemp(prefix="psa_ray_scale_"))
    corpus = work / "corpus"
    source = write_images(corpus)
    preset = bench_preset("tiny")
    weights = {k: export_untrained(k, preset, list(CLASS_NAMES), str(work)) for k in ("cam", "affinity")}
    results: dict[str, Any] = {"machine": describe_machine(), "startup": [], "stream": None,
                               "method": __doc__.split("\n\n", 1)[1].strip()}
    for rows in args.rows:
        manifest = write_manifest(corpus, rows, source)
        results["startup"].append(startup(manifest, rows, weights, work, args.after_first_label, args.timeout))
        print(json.dumps(results["startup"][-1]), flush=True)
    if args.stream_images:
        results["stream"] = stream(args.stream_images, source, corpus, weights, work)
        print(json.dumps({k: v for k, v in results["stream"].items() if k != "windows"}), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print("| rows | first decoded image, s | first label, s | driver peak RSS, MiB |")
    print("| ---: | ---: | ---: | ---: |")
    for r in results["startup"]:
        decoded, label = r["first_decoded_s"] or float("nan"), r["first_label_s"] or float("nan")
        print(f"| {r['rows']:,} | {decoded:.1f} | {label:.1f} "
              f"| {r['driver_peak_rss_mib']:.0f} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
