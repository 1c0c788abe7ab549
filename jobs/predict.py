"""Label new, untagged images with a trained DeepLab (see --help).

Laptop:   python jobs/predict.py --checkpoint outputs/demo/checkpoints/deeplab/model.pt \\
              --input photos/ --output outputs/predicted
Cluster:  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/predict.py \\
              --checkpoint s3://bucket/run1/checkpoints/deeplab/model.pt \\
              --input s3://bucket/new/manifest.parquet --output s3://bucket/new-labels
"""
from __future__ import annotations

import argparse
import json
import sys

from checkout import add_ray_options, parser  # first: puts the checkout's psa_ray on sys.path
from psa_ray.config import PRESETS
from psa_ray.errors import run_job
from psa_ray.pipeline.cluster import connect
from psa_ray.pipeline.predict import PredictJob, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser("Label images with a DeepLab trained on pseudo labels (jobs/label_dataset.py "
               "--train-segmentation): <output>/labels/<image_id>.png, shards/, errors/.")
    p.add_argument("--checkpoint", required=True,
                   help="DeepLab weights with meta.json beside them, e.g. <run>/checkpoints/deeplab/model.pt")
    p.add_argument("--input", required=True,
                   help="a manifest (.parquet/.jsonl/.csv with image_id and image columns; no tags "
                        "needed) or a folder/prefix of images, local or s3://")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the predictions "
                                                   "(not a labeling run's output)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="pipeline resources (batch size, actor pool); default: demo on a small "
                        "CPU-only cluster, else paper")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="the network's actors ask for GPUs (default: if the cluster has GPUs)")
    add_ray_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse, connect to Ray, predict, print the summary."""
    args = vars(parse_args(argv))
    connect(args.pop("endpoint_url"), args.pop("verbose"))
    summary = run(PredictJob(**args))
    print(json.dumps(summary, indent=2))
    print(f"\noutputs: {summary['output']}/labels, shards, errors, predict.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
