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
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psa_ray.config import PRESETS  # noqa: E402
from psa_ray.errors import UserError, run_job  # noqa: E402
from psa_ray.io.storage import exists, join, write_bytes  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Label images with a DeepLab trained on pseudo labels (jobs/label_dataset.py "
                    "--train-segmentation): <output>/labels/<image_id>.png, shards/, errors/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--endpoint-url", help="S3 endpoint override; default: AWS_ENDPOINT_URL")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    if exists(join(args.output, "run.json")):
        raise UserError(f"{args.output} holds a labeling run (run.json); its labels/ would mix with "
                        "the predictions: pass another --output")
    from psa_ray.pipeline.cluster import connect
    from psa_ray.pipeline.labeling import cluster_shape
    from psa_ray.pipeline.predict import image_rows, predict

    rows, row_errors = image_rows(args.input)
    connect()
    has_gpu, small = cluster_shape(args.use_gpu)
    preset = args.preset or ("demo" if small else "paper")
    started = time.perf_counter()
    counts = predict(rows, args.checkpoint, args.output, PRESETS[preset].pipeline, has_gpu, row_errors)
    summary = {"checkpoint": args.checkpoint, "input": args.input, "output": args.output,
               "preset": preset, "has_gpu": has_gpu, "counts": counts,
               "seconds": round(time.perf_counter() - started, 2)}
    write_bytes(join(args.output, "predict.json"), json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    print(f"\noutputs: {args.output}/labels, shards, errors, predict.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
