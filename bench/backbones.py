"""The tiny network against a pretrained backbone on the built-in corpora: the labeling job once
per (corpus, backbone, seed), as a user runs it.

    python bench/backbones.py                                  # birds and hard, tiny and lite0, seeds 0-2
    python bench/backbones.py --corpus hard --backbones lite0 --seeds 0
    python bench/backbones.py --collect --work DIR          # only the finished runs under DIR
    python bench/backbones.py --collect --work DIR --corpus hard --seeds 1 --picture hard_000004

Each run is `python jobs/label_dataset.py --corpus C --seed S --output <work>/C_B_sS` plus the
backbone's flags (`BACKBONE_FLAGS`); an output that already holds a run.json is read, not rerun.
Per run: the CAM network's held-out tag mAP, the mIoU and per-class IoU of CAM, psa's CAM rule,
CAM+CRF, the walk and the final labels, and run.json's seconds per stage. Writes
bench/results/backbones.json (with the machine) and prints the markdown tables. `--picture ID`
draws image ID as each backbone's run labelled it (the report's panels; first corpus and seed of
the grid), tiny on top, into bench/results/backbones_<corpus>_s<seed>_<ID>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.machine import describe_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "backbones.json")
BACKBONE_FLAGS = {"tiny": [], "lite0": ["--backbone-weights", "builtin:efficientnet_lite0"]}
VARIANTS = ("cam", "psa", "cam_crf", "rw", "rw_crf")
TITLES = ("CAM", "psa", "CAM+CRF", "walk", "walk+CRF")


def run_once(corpus: str, backbone: str, seed: int, work: str) -> dict[str, Any]:
    """One labeling job (or its finished output), summarised."""
    output = os.path.join(work, f"{corpus}_{backbone}_s{seed}")
    command = [sys.executable, os.path.join(REPO, "jobs", "label_dataset.py"), "--corpus", corpus,
               "--seed", str(seed), "--output", output, *BACKBONE_FLAGS[backbone]]
    if not os.path.exists(os.path.join(output, "run.json")):
        started = time.perf_counter()
        with open(output + ".log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"{corpus} {backbone} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    with open(os.path.join(output, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(output, "metrics.json")) as f:
        metrics = json.load(f)
    return {"corpus": corpus, "backbone": backbone, "seed": seed, "command": " ".join(command[1:]),
            "preset": run["preset"]["name"], "held_out_map": (run["cam_held_out"] or {}).get("map"),
            "miou": {v: metrics[v]["miou"] for v in VARIANTS},
            "iou": {v: metrics[v]["iou"] for v in VARIANTS}, "class_names": metrics["class_names"],
            "timings_s": run["timings_s"], "warnings": run["warnings"]}


def markdown(runs: list[dict[str, Any]]) -> str:
    """One table of every run's mIoU, then each corpus's per-class final IoU by backbone (seed 0)."""
    lines = ["| corpus | backbone | seed | held-out tag mAP | " + " | ".join(TITLES) + " | walk / CAM | minutes |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in TITLES) + " | ---: | ---: |"]
    for r in runs:
        m = r["miou"]
        mean_ap = "-" if r["held_out_map"] is None else f"{r['held_out_map']:.2f}"
        lines.append(f"| {r['corpus']} | {r['backbone']} | {r['seed']} | {mean_ap} | "
                     + " | ".join(f"{100 * m[v]:.1f}" for v in VARIANTS)
                     + f" | {m['rw'] / m['cam']:.2f} | {r['timings_s']['total'] / 60:.1f} |")
    for corpus in dict.fromkeys(r["corpus"] for r in runs):
        first = [r for r in runs if r["corpus"] == corpus and r["seed"] == min(x["seed"] for x in runs)]
        lines += ["", f"{corpus}, seed {first[0]['seed']}: IoU % per class, CAM+CRF -> walk+CRF", "",
                  "| class | " + " | ".join(r["backbone"] for r in first) + " |",
                  "| --- | " + " | ".join("---:" for _ in first) + " |"]
        for c, name in enumerate(first[0]["class_names"]):
            lines.append(f"| {name} | " + " | ".join(
                f"{_percent(r['iou']['cam_crf'][c])} -> {_percent(r['iou']['rw_crf'][c])}" for r in first) + " |")
    return "\n".join(lines)


def side_by_side(work: str, corpus: str, seed: int, backbones: list[str], image_id: str, folder: str) -> str:
    """One image as each backbone's run labelled it (the report's panels: image, CAM, walk, final,
    truth, drawn with that run's networks), stacked top to bottom in `backbones` order (PNG path)."""
    import numpy as np
    from PIL import Image

    from psa_ray.config import PRESETS
    from psa_ray.models.inference import load_trained
    from psa_ray.pipeline.report import sample_panels

    def read(run_dir: str, *path: str) -> np.ndarray:
        return np.asarray(Image.open(os.path.join(run_dir, *path)))

    pictures = []
    for backbone in backbones:
        run_dir = os.path.join(work, f"{corpus}_{backbone}_s{seed}")
        with open(os.path.join(run_dir, "run.json")) as f:
            run = json.load(f)
        with open(os.path.join(run_dir, "corpus", "classes.txt")) as f:
            names = f.read().split()
        gt = read(run_dir, "corpus", "gt", f"{image_id}.png")
        tags = np.array([(gt == k + 1).any() for k in range(len(names))], np.float32)  # the corpus's tags
        panels = sample_panels(np.asarray(Image.open(os.path.join(run_dir, "corpus", "images", f"{image_id}.png"))
                                          .convert("RGB")), tags, read(run_dir, "labels", f"{image_id}.png"), gt,
                               load_trained(run["checkpoints"]["cam"]), load_trained(run["checkpoints"]["affinity"]),
                               PRESETS[run["preset"]["name"]], names)
        pictures.append(Image.fromarray(panels))
    stacked = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    for k, picture in enumerate(pictures):
        stacked.paste(picture, (0, sum(p.height for p in pictures[:k])))
    path = os.path.join(folder, f"backbones_{corpus}_s{seed}_{image_id}.png")
    stacked.save(path)
    return path


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default="/tmp/psa_backbones", help="outputs of the runs (reused when complete)")
    p.add_argument("--corpus", nargs="+", default=["birds", "hard"])
    p.add_argument("--backbones", nargs="+", choices=sorted(BACKBONE_FLAGS), default=["tiny", "lite0"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--collect", action="store_true", help="run nothing: table the finished runs of the grid")
    p.add_argument("--picture", metavar="ID", help="stack the backbones' report pictures of this image")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    grid = [(corpus, backbone, seed) for corpus in args.corpus for backbone in args.backbones for seed in args.seeds]
    if args.collect:
        grid = [g for g in grid if os.path.exists(os.path.join(args.work, "{}_{}_s{}".format(*g), "run.json"))]
    runs = [run_once(corpus, backbone, seed, args.work) for corpus, backbone, seed in grid]
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump({"command": " ".join(["python bench/backbones.py", *(sys.argv[1:] if argv is None else argv)]),
                   "machine": describe_machine(), "runs": runs}, f, indent=2)
    print(markdown(runs))
    print(f"\nwrote {args.results}")
    if args.picture:
        print("wrote", side_by_side(args.work, args.corpus[0], args.seeds[0], args.backbones, args.picture,
                                    os.path.dirname(os.path.abspath(args.results))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
