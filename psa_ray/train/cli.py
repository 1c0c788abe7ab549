"""The command line shared by jobs/train_cam.py, train_affinity.py and train_segmentation.py."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import numpy as np

from psa_ray.config import PRESETS
from psa_ray.io.storage import absolute, join

MASK_FOLDER = {"affinity": "seeds", "deeplab": "labels"}
TITLE = {"cam": "the CAM (classification) network on image tags",
         "affinity": "AffinityNet on stage-B seed labels",
         "deeplab": "DeepLab on pseudo labels"}


def parse_args(kind: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Train {TITLE[kind]} with Ray Train.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", help="manifest or VOC folder; omitted: the built-in synthetic corpus")
    p.add_argument("--output", default="outputs/demo", help="run folder or s3:// prefix; "
                   f"weights go to <output>/checkpoints/{kind}/model.pt")
    p.add_argument("--classes", help="classes.txt path/URI or comma-separated names")
    if kind in MASK_FOLDER:
        p.add_argument("--masks", help=f"folder of <image_id>.png targets (default <output>/{MASK_FOLDER[kind]})")
        p.add_argument("--init", help="initial backbone weights, e.g. <output>/checkpoints/cam/model.pt")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--backbone", help="override the preset's backbone")
    p.add_argument("--backbone-weights", help="pretrained backbone weights (path or s3:// URI)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL when > 1 worker)")
    p.add_argument("--val-fraction", type=float, default=0.0 if kind != "cam" else 0.25,
                   help="held-out fraction" + (" for classification mAP" if kind == "cam" else ""))
    p.add_argument("--synthetic-images", type=int, default=300)
    p.add_argument("--endpoint-url", help="S3 endpoint override; default: AWS_ENDPOINT_URL")
    args = p.parse_args(argv)
    for name in ("input", "output", "masks", "init", "backbone_weights"):  # workers run elsewhere
        setattr(args, name, absolute(getattr(args, name, None)))
    if args.preset is None:
        args.preset = "demo" if args.input is None else "paper"
    return args


def main(kind: str, argv: list[str] | None = None) -> int:
    args = parse_args(kind, argv)
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    from psa_ray.data.synthetic import SyntheticConfig, split_ids, write_corpus
    from psa_ray.io.manifest import read_corpus
    from psa_ray.pipeline.cluster import connect
    from psa_ray.pipeline.labeling import corpus_rows, train_stage, with_masks
    from psa_ray.pipeline.readers import rows_dataset
    from psa_ray.train.evaluate import classifier_map

    connect()
    input_uri = args.input
    if input_uri is None:
        input_uri = join(args.output, "corpus", "manifest.parquet")
        write_corpus(join(args.output, "corpus"), SyntheticConfig(num_images=args.synthetic_images))
    corpus, _ = read_corpus(input_uri, classes=args.classes)
    rows = corpus_rows(corpus, None)
    train_ids, val_ids = split_ids([r["image_id"] for r in rows], args.val_fraction, seed=0)
    train_rows = [r for r in rows if r["image_id"] in set(train_ids)]
    val_rows = [r for r in rows if r["image_id"] in set(val_ids)]

    preset = PRESETS[args.preset]
    field = {"cam": "cam_train", "affinity": "affinity_train", "deeplab": "deeplab_train"}[kind]
    config = getattr(preset, field)
    overrides = {k: v for k, v in {"backbone": args.backbone, "backbone_weights": args.backbone_weights,
                                   "epochs": args.epochs, "num_workers": args.workers}.items() if v}
    config = replace(config, use_gpu=args.use_gpu, **overrides)
    preset = replace(preset, **{field: config})

    init = None
    if kind in MASK_FOLDER:
        train_rows = with_masks(train_rows, args.masks or join(args.output, MASK_FOLDER[kind]))
        init = {"uri": args.init, "backbone_only": True} if args.init else None
    weights, metrics = train_stage(kind, rows_dataset(train_rows), preset, list(corpus.class_names), args.output,
                                   init, args.cpus_per_worker)
    report = {"weights": weights, "train_images": len(train_rows), "metrics": metrics}
    if kind == "cam" and val_rows:
        report["val_images"] = len(val_rows)
        report["val_map"] = classifier_map(weights, val_rows)
    print(json.dumps(report, indent=2, default=lambda v: float(np.asarray(v))))
    return 0
