"""Benchmark: images/s of stage D (CAM -> AffinityNet -> walk -> CRF -> label PNG), Ray vs a plain loop.

On N synthetic images (`psa_ray.data.synthetic.write_corpus` into a temp folder) with untrained
networks exported the way `psa_ray.train.loop.fit` exports them (state dict + meta.json; speed
does not depend on the weights), under the demo preset with `--backbone`. Every run starts cold
in a fresh subprocess:

- sequential: the library functions of the pipeline's actors called one image after the other
  (`load_trained` for the networks, then per image read, decode, `tagged_cams`, `walk_scores`,
  `refine_label` + `shard_columns` (the CRF actor's work), `write_bytes`),
  timed per stage; with torch's default threads (the baseline) and, for reference, 1 thread;
- parallel loops (the bound): one such loop per core, 1 thread each, over its slice of the rows,
  side by side: what any pipeline could reach here without overheads;
- ray: `psa_ray.pipeline.stages.label_stage` after `ray.init(num_cpus=k)` in a process held
  to k cores (Ray's processes inherit its CPU affinity), in the layout this
  cluster gets (CPU-only: decode -> chained CAM + walk + CRF actors, one per core -> label
  sink, which also writes the parquet shards; with GPUs: network actor pool -> CRF actor pool)
  and, on CPU-only machines, also in the two-pool layout with its GPU requests zeroed. The time
  is the `label_stage` call (actor start-up and network loading included, `ray.init` reported
  apart); "steady" images/s count only the network operator's run. Ray Data's per-operator
  stats go into the JSON.

    python bench/pipeline.py                         # 128 images, tiny, Ray with 1 and 2 CPUs
    python bench/pipeline.py --images 1000 --cpus 2  # the figures in bench/README.md
    python bench/pipeline.py --backbone resnet38d    # on a GPU machine
    python bench/pipeline.py --quick                 # 4 images, Ray with 2 CPUs: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for bench.*

import torch

from bench.machine import describe_machine
from psa_ray.config import PRESETS, Preset, to_dict
from psa_ray.data.synthetic import SyntheticConfig, write_corpus
from psa_ray.io.images import decode_image
from psa_ray.io.inputs import read_corpus
from psa_ray.io.storage import join, list_files, read_bytes, write_bytes
from psa_ray.ops.pseudo_labels import refine_label, tagged_cams, walk_scores
from psa_ray.pipeline.readers import corpus_rows
from psa_ray.pipeline.writers import read_tables, shard_columns
from psa_ray.models.inference import (
    autocast_dtype, export_network, load_trained, model_input, network_meta)
from psa_ray.models.networks import build_network

DEFAULT_IMAGES, QUICK_IMAGES = 128, 4
DEFAULT_CPUS, QUICK_CPUS = (1, 2), (2,)
RUN_TIMEOUT_S = 1800
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "pipeline.json"


def bench_preset(backbone: str) -> Preset:
    """The demo preset with both networks on `backbone`."""
    demo = PRESETS["demo"]
    return replace(demo, cam_train=replace(demo.cam_train, backbone=backbone),
                   affinity_train=replace(demo.affinity_train, backbone=backbone))


def export_untrained(kind: str, preset: Preset, class_names: list[str], folder: str) -> str:
    """An untrained network as `fit` exports one: `<folder>/checkpoints/<kind>/{model.pt,meta.json}`."""
    config = preset.train_config(kind)
    torch.manual_seed(0)
    model = build_network(kind, config.backbone, len(class_names))
    return export_network(model.state_dict(), network_meta(kind, config, class_names, preset.walk.radius),
                          join(folder, "checkpoints", kind))


def prepare(folder: str, images: int, backbone: str) -> dict[str, Any]:
    """Corpus and network weights under folder; returns the spec both runs work from."""
    manifest = write_corpus(join(folder, "corpus"), SyntheticConfig(num_images=images, seed=0))
    corpus, _ = read_corpus(manifest)
    preset = bench_preset(backbone)
    return {"manifest": manifest, "backbone": backbone, "class_names": list(corpus.class_names),
            "cam_weights": export_untrained("cam", preset, list(corpus.class_names), folder),
            "affinity_weights": export_untrained("affinity", preset, list(corpus.class_names), folder)}


def load_rows(spec: dict[str, Any]) -> list[dict[str, Any]]:
    corpus, errors = read_corpus(spec["manifest"])
    if errors:
        raise RuntimeError(f"the synthetic manifest has rejected rows: {errors}")
    return corpus_rows(corpus, None)


class StageClock:
    """Seconds spent in each named stage, summed over images (CUDA work is waited for)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[stage] += time.perf_counter() - start


def count_labels(output: str) -> int:
    return len(list_files(join(output, "labels"), suffix=".png"))


def sequential_run(spec: dict[str, Any], output: str, part: int = 0, parts: int = 1) -> dict[str, Any]:
    """Stage D for every row (of slice `part` of `parts`), one after the other in this process,
    with per-stage times."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, rows = bench_preset(spec["backbone"]), load_rows(spec)[part::parts]
    clock = StageClock(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    autocast = autocast_dtype(device, preset.pipeline.mixed_precision)
    with clock("load_networks"):
        cam_net = load_trained(spec["cam_weights"], device)
        affinity_net = load_trained(spec["affinity_weights"], device)
    for row in rows:
        with clock("read"):
            data = read_bytes(row["image"])
        with clock("decode"):
            rgb = decode_image(data)
        with clock("cam"):
            [(class_ids, cams)] = tagged_cams(cam_net, [model_input(rgb, cam_net)], [row["tags"]], preset.cam,
                                              autocast)
        with clock("walk"):
            walked = walk_scores(affinity_net, [model_input(rgb, affinity_net)], [cams], preset.walk,
                                 autocast)[0].cpu().numpy()
        with clock("refine"):  # the CRF actor's work: blend, CRF, quality, restore, shard columns
            refined = refine_label(rgb, cams.float().cpu().numpy(), walked, class_ids, preset.walk,
                                   preset.cam.alpha_low)
            columns = shard_columns(refined.label, refined.confidence, len(spec["class_names"]) + 1,
                                    refined.quality, refined.restored)
        with clock("write"):
            write_bytes(join(output, "labels", f"{row['image_id']}.png"), columns["label_png"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    labeled = count_labels(output) if parts == 1 else len(rows)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": len(rows), "labeled": labeled,
            "images_per_s": labeled / seconds,
            "stage_seconds": dict(clock.seconds),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "autocast": str(autocast) if autocast else None}


@contextmanager
def keeping_ray_data_stats(lines: list[str]) -> Iterator[None]:
    """Collect `Dataset.stats()` (every operator) of each dataset written with `write_datasink`.

    `label_stage` builds and writes its dataset inside, so the stats are taken at the write.
    """
    from ray.data import Dataset

    write = Dataset.write_datasink

    def write_and_keep_stats(self: Dataset, *args: Any, **kwargs: Any) -> Any:
        result = write(self, *args, **kwargs)
        lines.extend(self.stats().splitlines())
        return result

    Dataset.write_datasink = write_and_keep_stats
    try:
        yield
    finally:
        Dataset.write_datasink = write


def network_operator_seconds(stats: list[str]) -> float | None:
    """Seconds from the first to the last block of the operator that runs the networks, read
    from Ray Data's stats ("Operator 1 MapBatches(...StageChain): 19 tasks executed, 19 blocks
    produced in 13.07s"): the pipeline's rate once its actors have started."""
    for line in stats:
        match = re.match(r"Operator \d+ .*(StageChain|NetworkActor|CamActor).*produced in ([0-9.]+)s", line)
        if match:
            return float(match.group(2))
    return None


def ray_run(spec: dict[str, Any], cpus: int, output: str, two_pools: bool = False) -> dict[str, Any]:
    """`label_stage` on a fresh local Ray with `cpus` CPUs, with Ray Data's stats. two_pools:
    the layout of GPU clusters (network actor pool, then CRF pool) even without a GPU (its GPU
    requests zeroed), to compare with the chained actors that CPU-only clusters get."""
    import ray
    from ray.data import DataContext

    from psa_ray.pipeline.stages import label_stage
    from psa_ray.pipeline.readers import rows_dataset

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    init_seconds = time.perf_counter() - started
    DataContext.get_current().execution_options.verbose_progress = False
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    preset = bench_preset(spec["backbone"])
    if two_pools and not has_gpu:
        preset = replace(preset, pipeline=replace(preset.pipeline, gpu_actor_gpus=0.0))
    rows, stats = load_rows(spec), []
    with keeping_ray_data_stats(stats):
        start = time.perf_counter()
        label_stage(rows_dataset(rows), preset, spec["cam_weights"], spec["affinity_weights"],
                    len(spec["class_names"]), output, run_id="bench", has_gpu=has_gpu or two_pools,
                    evaluate=False)
    seconds = time.perf_counter() - start
    ray.shutdown()
    labeled = count_labels(output)
    busy = network_operator_seconds(stats)
    errors = read_tables(join(output, "errors"))
    return {"cpus": cpus, "layout": "two pools" if has_gpu or two_pools else "chained",
            "seconds": seconds, "ray_init_seconds": init_seconds, "images": len(rows),
            "labeled": labeled, "images_per_s": labeled / seconds, "has_gpu": has_gpu,
            "network_operator_seconds": busy, "steady_images_per_s": labeled / busy if busy else None,
            "error_rows": 0 if errors is None else errors.num_rows,
            "first_errors": [] if errors is None else errors.slice(0, 3).to_pylist(),
            "ray_data_stats": stats}


def run_in_subprocess(spec_path: str, kind: str, count: int, output: str) -> dict[str, Any]:
    """One run in a fresh interpreter: kind "sequential" (count = torch threads, 0 = torch's
    default), "slice-<i>-<n>" (the same over rows i::n), "ray" (count = CPUs given to ray.init)
    or "ray-two-pools" (`ray_run`'s two_pools)."""
    command = [sys.executable, __file__, "--worker", spec_path, kind, str(count), output]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, never a running one
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, check=True)
    except subprocess.TimeoutExpired:
        return {"failed": f"no result after {RUN_TIMEOUT_S} s (hung?)"}
    except subprocess.CalledProcessError as e:
        return {"failed": f"exit {e.returncode}", "stderr_tail": e.stderr[-3000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    return result


def worker(spec_path: str, kind: str, count: int, output: str) -> dict[str, Any]:
    spec = json.loads(read_bytes(spec_path))
    if kind.startswith("ray"):
        cores = sorted(os.sched_getaffinity(0))
        if count < len(cores):  # Ray with k CPUs on k cores: its processes inherit this affinity
            os.sched_setaffinity(0, cores[:count])
        return ray_run(spec, count, output, two_pools=kind == "ray-two-pools")
    if count:
        torch.set_num_threads(count)
    if kind.startswith("slice-"):
        _, part, parts = kind.split("-")
        return sequential_run(spec, output, int(part), int(parts))
    return sequential_run(spec, output)


def parallel_loops_run(spec_path: str, processes: int, output: str) -> dict[str, Any]:
    """The bound for any pipeline on this machine: `processes` sequential loops with 1 thread
    each, side by side, each over its slice of the rows (no hand-offs, no scheduler). The
    time is the slowest loop's."""
    with ThreadPoolExecutor(processes) as pool:
        runs = list(pool.map(lambda i: run_in_subprocess(spec_path, f"slice-{i}-{processes}", 1, output),
                             range(processes)))
    failed = [run for run in runs if "images_per_s" not in run]
    if failed:
        return {"processes": processes, **failed[0]}
    seconds = max(run["seconds"] for run in runs)
    labeled = count_labels(output)
    return {"processes": processes, "seconds": seconds, "images": sum(run["images"] for run in runs),
            "labeled": labeled, "images_per_s": labeled / seconds,
            "load_average_1min_after": round(os.getloadavg()[0], 2)}


def contention_warnings(sequential: list[dict[str, Any]]) -> list[str]:
    """A note when torch's default threads ran far slower than 1 thread (other load on the cores)."""
    rates = [run.get("images_per_s") for run in sequential]
    if len(rates) == 2 and all(rates) and rates[1] > 1.5 * rates[0]:
        return [f"the sequential loop ran {rates[1] / rates[0]:.1f}x slower with torch's default threads "
                f"than with 1 thread: its OpenMP threads were fighting other load for the cores, so "
                f"ray_over_sequential flatters Ray; rerun on an idle machine"]
    return []


def run_benchmark(images: int, backbone: str, cpus: tuple[int, ...],
                  sequential_threads: tuple[int, ...]) -> dict[str, Any]:
    """Sequential runs (torch's default threads first), then Ray runs, each in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        spec_path = join(folder, "spec.json")
        write_bytes(spec_path, json.dumps(prepare(folder, images, backbone)).encode())
        sequential = []
        for threads in sequential_threads:
            result = run_in_subprocess(spec_path, "sequential", threads, join(folder, f"sequential_{threads}"))
            print(f"sequential, {threads or 'default'} threads: {result.get('images_per_s', result.get('failed'))}",
                  flush=True)
            sequential.append(result)
        bound = parallel_loops_run(spec_path, os.cpu_count() or 1, join(folder, "parallel_loops"))
        if "images_per_s" in bound and sequential[0].get("images_per_s"):
            bound["over_sequential"] = bound["images_per_s"] / sequential[0]["images_per_s"]
        print(f"{bound['processes']} sequential loops side by side, 1 thread each: "
              f"{bound.get('images_per_s', bound.get('failed'))}", flush=True)
        ray_runs = []
        kinds = ["ray"] if torch.cuda.is_available() else ["ray", "ray-two-pools"]
        for k, kind in [(k, kind) for k in cpus for kind in kinds]:
            result = {"cpus": k, **run_in_subprocess(spec_path, kind, k, join(folder, f"{kind}_{k}cpu"))}
            # as many ratios as sequential runs: one with --quick or on one thread, else two
            for name, baseline in zip(("ray_over_sequential", "ray_over_sequential_1_thread"), sequential,
                                      strict=False):
                if "images_per_s" in result and baseline.get("images_per_s"):
                    result[name] = result["images_per_s"] / baseline["images_per_s"]
            print(f"ray, {k} CPU, {result.get('layout')}: {result.get('images_per_s', result.get('failed'))}",
                  flush=True)
            ray_runs.append(result)
    return {
        "description": __doc__.split("\n\n")[0],
        "warnings": contention_warnings(sequential),
        "setup": {"images": images, "backbone": backbone, "preset": "demo",
                  "synthetic": to_dict(SyntheticConfig(num_images=images, seed=0)),
                  "pipeline": to_dict(PRESETS["demo"].pipeline), "cam": to_dict(PRESETS["demo"].cam),
                  "walk": to_dict(PRESETS["demo"].walk)},
        "images_per_s": "labeled images / seconds of the whole run (sequential: loading the networks "
                        "and the loop; ray: the label_stage call, without ray.init); each run in a "
                        "fresh process",
        "ratios": "ray_over_sequential: vs the sequential loop with torch's default threads (the "
                  "baseline of the issue); ray_over_sequential_1_thread: vs the loop with one thread; "
                  "parallel_loops.over_sequential: the bound (one 1-thread loop per core) vs the baseline",
        "steady_images_per_s": "ray: images / seconds of the operator that runs the networks (from "
                               "its first to its last block), i.e. without the actors' start-up",
        "machine": describe_machine(),
        "sequential": sequential,
        "parallel_loops": bound,
        "ray": ray_runs,
    }


def markdown(result: dict[str, Any]) -> str:
    """The runs side by side, then the sequential loop's time per stage."""
    lines = ["| run | seconds | images/s | steady images/s | vs sequential | vs sequential 1 thread | load after |",
             "|---|---|---|---|---|---|---|"]
    bound = result.get("parallel_loops", {})
    for run in result["sequential"] + [bound] + result["ray"]:
        if "cpus" in run:
            name = f"ray, {run['cpus']} CPU, {run.get('layout', '?')}"
        elif "processes" in run:
            name = f"{run['processes']} sequential loops side by side, 1 thread each (bound)"
        else:
            name = f"sequential, {run.get('torch_threads', '?')} threads"
        if "images_per_s" not in run:
            lines.append(f"| {name} | failed: {run.get('failed')} | - | - | - | - | - |")
            continue
        steady = run.get("steady_images_per_s")
        ratios = [f"{run[k]:.2f}x" if k in run else "-"
                  for k in ("ray_over_sequential", "ray_over_sequential_1_thread")]
        if "over_sequential" in run:
            ratios[0] = f"{run['over_sequential']:.2f}x"
        lines.append(f"| {name} | {run['seconds']:.1f} | {run['images_per_s']:.2f} | "
                     f"{f'{steady:.2f}' if steady else '-'} | {ratios[0]} | {ratios[1]} "
                     f"| {run['load_average_1min_after']} |")
    for run in result["sequential"]:
        if "stage_seconds" in run:
            lines += ["", f"| sequential stage ({run['torch_threads']} threads) | seconds | ms/image | share |",
                      "|---|---|---|---|"]
            lines += [f"| {stage} | {seconds:.2f} | {1000 * seconds / run['images']:.1f} "
                      f"| {100 * seconds / run['seconds']:.0f}% |" for stage, seconds in run["stage_seconds"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, help=f"synthetic images (default {DEFAULT_IMAGES}, quick {QUICK_IMAGES})")
    parser.add_argument("--backbone", default="tiny", help="tiny (CPU), resnet38d (GPU machines), resnet50")
    parser.add_argument("--cpus", type=int, nargs="+", help=f"Ray CPU counts (default {DEFAULT_CPUS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_IMAGES} images, Ray with {QUICK_CPUS} CPUs, no 1-thread sequential run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the JSON goes")
    parser.add_argument("--worker", nargs=4, metavar=("SPEC", "KIND", "COUNT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one run, in the subprocess that run_in_subprocess started
        spec_path, kind, count, output = args.worker
        print(json.dumps(worker(spec_path, kind, int(count), output)))
        return
    images = args.images or (QUICK_IMAGES if args.quick else DEFAULT_IMAGES)
    cpus = tuple(args.cpus or (QUICK_CPUS if args.quick else DEFAULT_CPUS))
    threads = (0,) if args.quick or torch.get_num_threads() == 1 else (0, 1)
    result = run_benchmark(images, args.backbone, cpus, threads)
    result["quick"] = args.quick
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
