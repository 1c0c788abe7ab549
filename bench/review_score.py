"""The per-image quality score (shards/ column `quality`) against each image's true mIoU.

Runs the default labeling job on the built-in corpus (or scores a finished run, `--run`), then
reads every shard row's score and scores its label against the ground truth: Spearman's rank
correlation, and the mean true mIoU of the images ranked lowest (what a reviewer sees first)
against all. Writes bench/results/review_score.json.

    python bench/review_score.py [--quick] [--run OUTPUT] [--gt FOLDER] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import describe_machine
from psa_ray.io.palette import decode_label_png
from psa_ray.io.storage import join, read_bytes
from psa_ray.ops.metrics import confusion_matrix, mean_iou
from psa_ray.pipeline.writers import read_tables


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    out = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(ranks(np.asarray(x, float)), ranks(np.asarray(y, float)))[0, 1])


def score_run(output: str, gt: str) -> dict[str, Any]:
    """Spearman of `quality` against per-image mIoU over the labeled images of a run."""
    shards = read_tables(join(output, "shards"), columns=["image_id", "quality"])
    if shards is None:
        raise SystemExit(f"no shards under {output}")
    meta = json.loads(read_bytes(join(output, "metrics.json")))
    k = len(meta["class_names"])
    scores, mious = [], []
    for row in shards.to_pylist():
        label = decode_label_png(read_bytes(join(output, "labels", f"{row['image_id']}.png")))
        truth = decode_label_png(read_bytes(join(gt, f"{row['image_id']}.png")))
        scores.append(row["quality"])
        mious.append(mean_iou(confusion_matrix(label, truth, k)))
    s, m = np.asarray(scores, float), np.asarray(mious, float)
    lowest = np.argsort(s, kind="stable")
    tenth = max(1, len(s) // 10)
    rho = spearman(s, m)
    return {"images": len(s), "spearman": None if np.isnan(rho) else round(rho, 3),  # None: all scores equal
            "miou_all": round(float(m.mean()), 4),
            "miou_lowest_tenth_by_score": round(float(m[lowest[:tenth]].mean()), 4),
            "miou_highest_tenth_by_score": round(float(m[lowest[-tenth:]].mean()), 4),
            "score_quantiles": {f"p{q}": round(float(np.percentile(s, q)), 3) for q in (10, 50, 90)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a finished labeling output (default: run the default job now)")
    p.add_argument("--gt", help="ground truth folder (default: <run>/corpus/gt, the built-in corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a 40-image, 1-epoch job (a smoke run)")
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "review_score.json"))
    args = p.parse_args()
    run = args.run
    if run is None:
        run = tempfile.mkdtemp(prefix="psa_ray-review-")
        command = [sys.executable, os.path.join(os.path.dirname(__file__), "..", "jobs", "label_dataset.py"),
                   "--output", run, "--seed", str(args.seed)]
        if args.quick:
            command += ["--synthetic-images", "40", "--epochs", "1"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = {"run": run, "seed": args.seed, "quick": args.quick,
              **score_run(run, args.gt or join(run, "corpus", "gt")), "machine": describe_machine()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print("| images | Spearman | mIoU all | lowest tenth by score | highest tenth |\n| --- | --- | --- | --- | --- |")
    print(f"| {result['images']} | {result['spearman']} | {100 * result['miou_all']:.1f} | "
          f"{100 * result['miou_lowest_tenth_by_score']:.1f} | {100 * result['miou_highest_tenth_by_score']:.1f} |")


if __name__ == "__main__":
    main()
