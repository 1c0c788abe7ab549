"""The command line of jobs/train_cam.py, train_affinity.py and train_segmentation.py (run those)."""
from __future__ import annotations

import argparse
import json

import numpy as np

from checkout import add_network_options, add_ray_options, parser  # first: the checkout on sys.path
from psa_ray.models.networks import network_spec
from psa_ray.pipeline.cluster import connect
from psa_ray.pipeline.training import TrainJob, train_network


def parse_args(kind: str, argv: list[str] | None = None) -> argparse.Namespace:
    spec = network_spec(kind)
    p = parser(f"Train {spec.title} with Ray Train.")
    p.add_argument("--input", help="manifest or VOC folder; omitted: the built-in synthetic corpus")
    p.add_argument("--output", default="outputs/demo", help="run folder or s3:// prefix; "
                   f"weights go to <output>/checkpoints/{kind}/model.pt")
    p.add_argument("--classes", help="classes.txt path/URI or comma-separated names")
    if spec.mask_folder:
        p.add_argument("--masks", help=f"folder of <image_id>.png targets (default <output>/{spec.mask_folder})")
        p.add_argument("--init", help="initial backbone weights, e.g. <output>/checkpoints/cam/model.pt")
    add_network_options(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL when > 1 worker)")
    p.add_argument("--val-fraction", type=float, default=0.0 if spec.mask_folder else 0.25,
                   help="held-out fraction" + ("" if spec.mask_folder else " for classification mAP"))
    p.add_argument("--synthetic-images", type=int,
                   help="size of the built-in corpus (default: the labeling job's); never written over another")
    add_ray_options(p)
    return p.parse_args(argv)


def main(kind: str, argv: list[str] | None = None) -> int:
    """Parse, connect to Ray, train, print the report (JSON)."""
    args = vars(parse_args(kind, argv))
    connect(args.pop("endpoint_url"), args.pop("verbose"))
    report = train_network(kind, TrainJob(**args))
    print(json.dumps(report, indent=2, default=lambda v: float(np.asarray(v))))
    return 0
