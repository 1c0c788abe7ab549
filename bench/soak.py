"""Soak: stage D over many small images with fixed networks; does a long run hold?

One `label_stage` call (the labeling job's stage D: decode -> CAM + AffinityNet + walk + CRF
actors -> label PNGs and shards) on a fresh local Ray, over `--images` rows of small synthetic
images (`--distinct` of them drawn and written, the manifest repeating them under distinct
image ids: decoding and labeling cost the same, the corpus takes seconds to write), with untrained
networks exported as `fit` exports them (`bench.pipeline.prepare`; speed and memory do not depend
on the weights). Every `--window` labels (counted in labels/ every half second) it records the
images/s of the window and the RSS of the driver and of every Ray process (the driver's
descendants: GCS, raylet, agents, workers, named by their titles, e.g. `ray::MapWorker(...)`).

It holds when no process alive at the first window is more than 10% above that window's RSS at
the end, and the images/s of the last full window is within 10% of the first steady window's
(the second: the first includes actor start-up). Both verdicts are in the JSON.

    python bench/soak.py                               # 50,000 images, a sample every 5,000 labels
    python bench/soak.py --images 2000 --window 250    # a smoke run (minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for bench.*

from bench.machine import describe_machine
from bench.pipeline import bench_preset, prepare
from psa_ray.io.inputs import read_corpus
from psa_ray.io.rows import Corpus, CorpusRow
from psa_ray.pipeline.readers import corpus_rows

DEFAULT_IMAGES, DEFAULT_WINDOW, DEFAULT_DISTINCT = 50_000, 5_000, 1_000
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "soak.json"
RSS_LIMIT, RATE_LIMIT = 0.10, 0.10


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, RSS in KiB) of a live process; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")[:120]
    except OSError:
        return "?"


def process_rss() -> dict[str, dict[str, Any]]:
    """{pid: {"title", "rss_mib"}} of this process (title "driver") and all its descendants."""
    parents, rss = {}, {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        stat = _stat(int(name))
        if stat:
            parents[int(name)], rss[int(name)] = stat
    found, grown = {os.getpid()}, True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grown = bool(children)
    return {str(pid): {"title": "driver" if pid == os.getpid() else _title(pid),
                       "rss_mib": round(rss[pid] / 1024, 1)} for pid in sorted(found) if pid in rss}


def _count(folder: str) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if e.name.endswith(".png"))
    except FileNotFoundError:
        return 0


def soak_rows(folder: str, images: int, distinct: int, backbone: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The networks' spec (`bench.pipeline.prepare` on `distinct` images) and `images` pipeline
    rows cycling over them with ids soak_000000, ..."""
    spec = prepare(folder, min(images, distinct), backbone)
    corpus, _ = read_corpus(spec["manifest"])
    base = corpus.rows
    rows = [CorpusRow(f"soak_{i:06d}", base[i % len(base)].image, base[i % len(base)].tags) for i in range(images)]
    return spec, corpus_rows(Corpus(rows, corpus.class_names), None)


def run_soak(images: int, window: int, distinct: int, cpus: int, backbone: str) -> dict[str, Any]:
    import ray
    from ray.data import DataContext

    from psa_ray.pipeline.readers import rows_dataset
    from psa_ray.pipeline.stages import label_stage

    with tempfile.TemporaryDirectory() as folder:
        spec, rows = soak_rows(folder, images, distinct, backbone)
        output = os.path.join(folder, "out")
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        DataContext.get_current().execution_options.verbose_progress = False
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        failure: list[BaseException] = []

        def stage() -> None:
            try:
                label_stage(rows_dataset(rows), bench_preset(backbone), spec["cam_weights"], spec["affinity_weights"],
                            len(spec["class_names"]), output, run_id="soak", has_gpu=has_gpu, evaluate=False)
            except BaseException as e:  # reported by the main thread
                failure.append(e)

        started = time.perf_counter()
        thread = threading.Thread(target=stage, daemon=True)
        thread.start()
        samples: list[dict[str, Any]] = []
        mark, last = window, (0, 0.0)
        labels = os.path.join(output, "labels")
        while thread.is_alive() or mark <= images:
            done, now = _count(labels), time.perf_counter() - started
            if done >= mark or not thread.is_alive():
                samples.append({"labels": done, "seconds": round(now, 2),
                                "window_images_per_s": round((done - last[0]) / max(now - last[1], 1e-9), 3),
                                "load_average_1min": round(os.getloadavg()[0], 2), "processes": process_rss()})
                last, mark = (done, now), (done // window + 1) * window
                if not thread.is_alive():
                    break
            time.sleep(0.5)
        thread.join()
        seconds = time.perf_counter() - started
        ray.shutdown()
        if failure:
            raise failure[0]
        labeled = _count(labels)
    return {"images": images, "window": window, "distinct_images": min(images, distinct), "cpus": cpus,
            "backbone": backbone, "labeled": labeled, "seconds": round(seconds, 2),
            "images_per_s": round(labeled / seconds, 3), "samples": samples, **verdicts(samples, window),
            "machine": describe_machine()}


def verdicts(samples: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """rss_growth: each process's end RSS over its RSS at the first sample (`window` labels; those
    alive at both); the rate: the last window's images/s (the one before if the last holds under
    half a window) against the first steady window's (the second sample's)."""
    first, end = samples[0], samples[-1]
    growth = {pid: {"title": p["title"], "first_mib": p["rss_mib"], "end_mib": end["processes"][pid]["rss_mib"],
                    "growth": round(end["processes"][pid]["rss_mib"] / p["rss_mib"] - 1, 4)}
              for pid, p in first["processes"].items() if pid in end["processes"] and p["rss_mib"] > 0}
    worst = max(growth.values(), key=lambda g: g["growth"], default=None)
    steady = last = rate_change = None
    if len(samples) >= 3:
        steady = samples[1]["window_images_per_s"]
        short = samples[-1]["labels"] - samples[-2]["labels"] < window / 2
        last = samples[-2 if short else -1]["window_images_per_s"]
        rate_change = round(last / steady - 1, 4) if steady else None
    return {"rss_growth": growth, "worst_rss_growth": worst,
            "rss_holds": worst is None or worst["growth"] <= RSS_LIMIT,
            "first_steady_images_per_s": steady, "last_window_images_per_s": last, "rate_change": rate_change,
            "rate_holds": rate_change is None or abs(rate_change) <= RATE_LIMIT,
            "gone_or_new_processes": sorted(set(first["processes"]) ^ set(end["processes"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="labels between samples")
    parser.add_argument("--distinct", type=int, default=DEFAULT_DISTINCT, help="images drawn; the rows repeat them")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs given to ray.init")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the JSON goes")
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)  # a fresh local Ray, never a running one
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    result = run_soak(args.images, args.window, args.distinct, args.cpus, args.backbone)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for s in result["samples"]:
        rss = sum(p["rss_mib"] for p in s["processes"].values())
        print(f"{s['labels']:>7} labels {s['seconds']:>8.1f} s  {s['window_images_per_s']:>7.2f} images/s  "
              f"RSS {rss:>8.1f} MiB in {len(s['processes'])} processes")
    worst = result["worst_rss_growth"]
    print(f"RSS holds: {result['rss_holds']} (worst {worst and worst['title']}: {worst and worst['growth']:+.1%}); "
          f"rate holds: {result['rate_holds']} (last window {result['rate_change']} vs the first steady one)")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
