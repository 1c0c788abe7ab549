"""Score label PNGs against ground truth: per-class IoU and mIoU (see --help).

    python jobs/evaluate.py outputs/demo/labels --gt outputs/demo/corpus/gt \\
        --classes outputs/demo/corpus/classes.txt
    python jobs/evaluate.py s3://bucket/run1/labels --gt s3://bucket/VOC2012/SegmentationClass \\
        --classes aeroplane,bicycle,... --json s3://bucket/run1/val_iou.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from checkout import parser  # first: puts the checkout's psa_ray on sys.path
from psa_ray.errors import run_job
from psa_ray.io.classes import resolve_classes
from psa_ray.io.lease import current_holder, holder_text
from psa_ray.io.redact import redact
from psa_ray.io.storage import parent, write_bytes
from psa_ray.pipeline.scoring import iou_table, score_folders

LISTED = 5  # ids shown when some labels or ground truths have no partner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser("Score a folder of <image_id>.png label maps against a folder of ground-truth "
               "<image_id>.png (local or s3://): per-class IoU and mIoU, ground truth 255 ignored.")
    p.add_argument("labels", help="folder or s3:// prefix of label PNGs (e.g. <output>/labels)")
    p.add_argument("--gt", required=True, help="folder or s3:// prefix of ground-truth PNGs")
    p.add_argument("--classes", help="class names without background: a classes.txt path/URI or "
                                     "comma-separated names (default: 'class k', the number of "
                                     "classes inferred from the largest value seen)")
    p.add_argument("--json", help="also write the result as JSON to this path or s3:// URI")
    p.add_argument("--endpoint-url", help="S3 endpoint override; default: AWS_ENDPOINT_URL")
    return p.parse_args(argv)


def _listed(ids: list[str]) -> str:
    shown = ", ".join(ids[:LISTED])
    return shown + (f", ... ({len(ids) - LISTED} more)" if len(ids) > LISTED else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    output = parent(args.labels.rstrip("/"))
    if holder := current_holder(output):
        print(f"warning: {redact(output)} is still being written by {holder_text(holder)}: the score covers "
              "the labels written so far", file=sys.stderr)
    names = resolve_classes(args.classes, args.labels) if args.classes else None
    result = score_folders(args.labels, args.gt, None if names is None else len(names) + 1)
    class_names = ["background", *(names or [f"class {k}" for k in range(1, result["num_classes"])])]
    for ids, what in ((result["labels_without_gt"], f"labels have no ground truth under {args.gt}"),
                      (result["gt_without_labels"], f"ground-truth files have no label under {args.labels}")):
        if ids:
            print(f"warning: {len(ids)} {what} (not scored): {_listed(ids)}", file=sys.stderr)
    print(f"IoU (%) of {result['images']} images:")
    print(iou_table(class_names, {"IoU": result}))
    if args.json:
        write_bytes(args.json, json.dumps({"class_names": class_names, **result}, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
