"""Label a tag-only image corpus with AffinityNet pseudo labels (the main psa_ray job).

Laptop:   python jobs/label_dataset.py                      (built-in synthetic corpus, CPU, minutes)
          python jobs/label_dataset.py --corpus hard --output outputs/hard   (the harder one)
Cluster:  ray job submit --address http://HEAD:8265 --working-dir . -- \\
              python jobs/label_dataset.py --input s3://bucket/manifest.parquet --output s3://bucket/run1 \\
              --preset paper --backbone resnet38d --backbone-weights s3://bucket/weights/ilsvrc-res38.pth
"""
from __future__ import annotations

import argparse
import json
import sys

from checkout import add_network_options, add_ray_options, parser  # first: the checkout on sys.path
from psa_ray.data import CORPORA
from psa_ray.errors import run_job
from psa_ray.io.redact import redact
from psa_ray.pipeline.cluster import connect
from psa_ray.pipeline.labeling import LabelJob, run
from psa_ray.pipeline.report import quality_sections, text_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser("Turn a tag-only image corpus into dense pseudo labels (CAM -> AffinityNet -> "
               "random walk -> CRF), on a local Ray or a cluster (ray job submit).")
    p.add_argument("--input", help="manifest (.parquet/.jsonl/.csv) or VOC2012 folder, local or s3://; "
                                   "omitted: the built-in synthetic corpus")
    p.add_argument("--output", default="outputs/demo", help="output folder or s3:// prefix")
    p.add_argument("--classes", help="class names: a classes.txt path/URI or comma-separated names "
                                     "(default: classes.txt beside the manifest)")
    p.add_argument("--gt", help="folder/prefix of ground-truth <image_id>.png for metrics.json")
    add_network_options(p)
    p.add_argument("--cam-checkpoint", help="trained CAM network weights: skips its training")
    p.add_argument("--affinity-checkpoint", help="trained AffinityNet weights: skips seeds and training")
    p.add_argument("--train-segmentation", action="store_true",
                   help="then train DeepLab on the pseudo labels")
    p.add_argument("--train-images", type=int, default=20000,
                   help="the CAM network and AffinityNet train on this many images (the same "
                        "sample for both, chosen by a digest of image_id), seeds are computed for "
                        "them only; every image is labeled (PASCAL VOC trains on 10,582)")
    p.add_argument("--held-out", type=float, default=0.1,
                   help="share of the training sample the CAM network does not train on; its tag AP "
                        "per class on them is in run.json (cam_held_out); 0: none")
    p.add_argument("--shard-rows", type=int, help="rows per shards/*.parquet file (default 2048)")
    p.add_argument("--corpus", choices=sorted(CORPORA),
                   help="the built-in synthetic corpus of a run without --input: birds (default; "
                        "classes told by head colour) or hard (classes told by texture and shape, "
                        "several small objects on cluttered backgrounds)")
    p.add_argument("--synthetic-images", type=int,
                   help="size of the built-in corpus (default: "
                        + ", ".join(f"{config().num_images} {name}" for name, config in CORPORA.items()) + ")")
    p.add_argument("--train-workers", type=int, help="Ray Train workers per network")
    p.add_argument("--epochs", type=int, help="override every network's epochs (quick trials)")
    p.add_argument("--crop-size", type=int, help="override every network's training crop (quick trials)")
    p.add_argument("--scales", type=float, nargs="+", help="override the CAM scales (quick trials)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU actors and training workers ask for GPUs (default: if the cluster has "
                        "GPUs at start; pass --use-gpu on autoscaling clusters whose GPU group "
                        "starts at 0)")
    add_ray_options(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the built-in corpus and every network's training (initialisation, "
                        "dropout, augmentation): the same command gives the same labels")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse, connect to Ray, run the job, print its summary and IoU table."""
    args = vars(parse_args(argv))
    connect(args.pop("endpoint_url"), args.pop("verbose"))
    summary = run(LabelJob(**{**args, "scales": tuple(args["scales"]) if args["scales"] else None}))
    print("\n=== psa_ray run", summary["run_id"], "===")
    for key in ("counts", "timings_s", "checkpoints"):
        print(f"{key}: {redact(json.dumps(summary[key]))}")
    print(text_report(quality_sections({**summary, "warnings": []}, summary["metrics_full"])))
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"\noutputs: {summary['output']}/labels, shards, errors, run.json"
          + (", metrics.json" if summary["metrics_full"] else ""))
    print(f"report: {summary['report']} (pictures, the images to check first)")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
