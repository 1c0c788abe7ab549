"""Benchmark: the whole job under the `paper` preset (psa's recipe) on a GPU machine, images/s per stage.

Runs `psa_ray.pipeline.labeling.run` (stages A-D, and E with --train-segmentation) on a corpus:
`--input` (a manifest or VOC folder, e.g. VOC 2012 train) or N synthetic images of photo size
(320-500 px). The backbone starts from `--backbone-weights`, or, without them, from a random
state dict saved in the reference's key layout (speed does not depend on the weights, and the
frozen-BN path of pretrained backbones runs either way). Reports, per stage, seconds and
images/s (training stages: images x epochs / s) from the run's `timings_s`, and the machine.

    python bench/paper_gpu.py                                   # 200 synthetic images, resnet38d, 1 epoch
    python bench/paper_gpu.py --input /data/VOC2012 --backbone-weights res38.pth --epochs 1
    python bench/paper_gpu.py --quick                           # 4 tiny images, resnet50, CPU: a smoke run

Nothing here has run on a GPU yet (no GPU was lent to this project's sessions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for bench.*

import torch

from bench.machine import describe_machine
from psa_ray.config import PRESETS, to_dict

STAGES = ("train_cam", "seeds", "train_affinity", "labels", "train_deeplab")
TRAINING = {"train_cam", "train_affinity", "train_deeplab"}


def random_pretrained_weights(backbone: str, path: str) -> str:
    """A random backbone state dict in the key layout of its reference checkpoints (psa's names
    for resnet38d, torchvision's resnet50 with `fc`)."""
    if backbone == "resnet50":
        from torchvision.models import resnet50
        state = resnet50(weights=None).state_dict()
    else:
        from psa_ray.models.backbones import build_backbone
        state = build_backbone(backbone).state_dict()
    torch.save(state, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="manifest or VOC folder; default: synthetic images")
    p.add_argument("--gt", help="ground-truth folder for metrics.json (synthetic: its own)")
    p.add_argument("--images", type=int, default=200, help="synthetic images")
    p.add_argument("--backbone", default="resnet38d", choices=("resnet38d", "resnet50"))
    p.add_argument("--backbone-weights", help="pretrained backbone weights (default: random, saved)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every network (psa: 15 and 8)")
    p.add_argument("--train-workers", type=int, help="Ray Train workers (default: the preset's)")
    p.add_argument("--train-segmentation", action="store_true", help="also time stage E (DeepLab)")
    p.add_argument("--work-dir", help="job output folder (default: a temp folder)")
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "paper_gpu.json"))
    p.add_argument("--quick", action="store_true",
                   help="4 images of 48-64 px, resnet50, crop 32, one scale: a smoke run, on CPU too")
    args = p.parse_args(argv)

    import ray

    from psa_ray.data.synthetic import SyntheticConfig, write_corpus
    from psa_ray.pipeline.labeling import LabelJob, run

    work = args.work_dir or tempfile.mkdtemp(prefix="paper_gpu_")
    quick = dict(crop_size=32, scales=(1.0,)) if args.quick else {}
    backbone = "resnet50" if args.quick else args.backbone
    ray.init()
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if args.quick and not has_gpu:
        # the paper's whole-CPU actor requests leave no CPU for the reads on a small machine
        PRESETS["paper"] = replace(PRESETS["paper"], pipeline=PRESETS["demo"].pipeline)
    input_uri, gt = args.input, args.gt
    if input_uri is None:
        size = (48, 64) if args.quick else (320, 500)
        input_uri = write_corpus(os.path.join(work, "corpus"), SyntheticConfig(
            num_images=4 if args.quick else args.images, min_size=size[0], max_size=size[1]))
        gt = os.path.join(work, "corpus", "gt")
    weights = args.backbone_weights or random_pretrained_weights(backbone, os.path.join(work, "pretrained.pth"))
    started = time.perf_counter()
    summary = run(LabelJob(output=os.path.join(work, "out"), input=input_uri, gt=gt, preset="paper",
                           backbone=backbone, backbone_weights=weights, epochs=args.epochs,
                           train_workers=args.train_workers, train_segmentation=args.train_segmentation,
                           **quick))
    wall = time.perf_counter() - started
    images = summary["counts"]["input_rows"]
    stages = {}
    for stage in STAGES:
        seconds = summary["timings_s"].get(stage)
        if seconds:
            work_items = images * (args.epochs if stage in TRAINING else 1)
            stages[stage] = {"seconds": seconds, "images_per_s": round(work_items / seconds, 3)}
    result = {"machine": describe_machine(), "has_gpu": has_gpu, "cluster": ray.cluster_resources(),
              "images": images, "epochs": args.epochs, "backbone": backbone, "quick": args.quick,
              "input": input_uri, "stages": stages, "wall_s": round(wall, 2),
              "counts": summary["counts"], "metrics": summary["metrics"], "preset": to_dict(
                  PRESETS["paper"]), "overrides": {"epochs": args.epochs, **quick}}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"paper preset, {backbone}, {images} images, {args.epochs} epoch(s), GPU: {result['machine']['gpu']}")
    print("| stage | s | images/s |\n| --- | ---: | ---: |")
    for stage, row in stages.items():
        print(f"| {stage} | {row['seconds']:.1f} | {row['images_per_s']:.2f} |")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
