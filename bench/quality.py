"""Label quality on the built-in synthetic corpus, with a held-out validation split.

1. The labeling job (demo preset, --train-segmentation) runs on the training split: mIoU of CAM,
   CAM+CRF, random walk and random walk+CRF against the true masks of those images.
2. DeepLab trained on those pseudo labels, and DeepLab trained on the true masks (the upper
   bound; same backbone, same initialisation from the CAM network, same schedule), label the
   validation images; both are scored against the validation masks.
3. Ablations of the walk on the training split, with the trained networks fixed: beta, t,
   radius (at inference; AffinityNet is trained at 5) and the background alpha.

    python bench/quality.py                  # full: 400 images (300 train), ~15 min on 2 CPU cores
    python bench/quality.py --quick          # smoke run: 40 images, 1 epoch, 2 ablations

Results: bench/results/quality.json (with the machine description) and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from psa_ray.config import to_dict  # noqa: E402
from psa_ray.data.synthetic import SyntheticConfig, split_ids, write_corpus  # noqa: E402
from psa_ray.io.manifest import CorpusRow, write_classes, write_manifest# noqa: E402
from psa_ray.io.inputs import read_corpus# noqa: E402
from psa_ray.io.storage import join, list_files, read_bytes, write_bytes  # noqa: E402
from psa_ray.pipeline.labeling import LabelJob, resolve_preset, run  # noqa: E402
from psa_ray.pipeline.readers import corpus_rows, rows_dataset, with_masks  # noqa: E402
from psa_ray.pipeline.predict import predict  # noqa: E402
from psa_ray.pipeline.scoring import evaluation, score_folders  # noqa: E402
from psa_ray.pipeline.stages import label_stage, train_stage  # noqa: E402
from psa_ray.train.tasks import Init  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality.json")
REPORT_PICTURES = 2   # report pictures of the pseudo labels copied beside the results
ABLATIONS = {"beta": (2.0, 4.0, 16.0), "t": (16, 64, 1024), "radius": (3, 4), "alpha": (8.0, 32.0)}


def split_manifests(root: str, images: int, val_fraction: float, seed: int) -> dict[str, Any]:
    """Write the corpus, then train/val manifests (absolute image paths) beside it."""
    manifest = write_corpus(root, SyntheticConfig(num_images=images, seed=seed))
    corpus, _ = read_corpus(manifest)
    train_ids, val_ids = split_ids([r.image_id for r in corpus.rows], val_fraction, seed)
    out = {"gt": join(root, "gt"), "class_names": list(corpus.class_names)}
    for name, ids in (("train", set(train_ids)), ("val", set(val_ids))):
        folder = join(root, name)
        write_manifest([CorpusRow(r.image_id, r.image, list(r.tags)) for r in corpus.rows
                        if r.image_id in ids], join(folder, "manifest.parquet"))
        write_classes(corpus.class_names, join(folder, "classes.txt"))
        out[name] = join(folder, "manifest.parquet")
        out[f"{name}_images"] = len(ids)
    return out


def deeplab_on_val(checkpoint: str, split: dict[str, Any], output: str, pipeline) -> dict[str, Any]:
    """DeepLab's labels for the validation images, scored against their true masks."""
    corpus, _ = read_corpus(split["val"])
    rows = [{"image_id": r.image_id, "image": r.image} for r in corpus.rows]
    predict(rows, checkpoint, output, pipeline, has_gpu=False)
    return score_folders(join(output, "labels"), split["gt"], len(split["class_names"]) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default=f"/tmp/psa_quality_{uuid.uuid4().hex[:8]}", help="scratch folder")
    p.add_argument("--images", type=int, default=400,
                   help="corpus size; 3/4 train (as many as the demo labels), 1/4 val")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--epochs", type=int, help="override every network's epochs")
    p.add_argument("--quick", action="store_true", help="40 images, 1 epoch, two ablations")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs = min(args.images, 40), args.epochs or 1
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    split = split_manifests(join(args.work, "corpus"), args.images, args.val_fraction, args.seed)
    names = split["class_names"]

    job = LabelJob(output=join(args.work, "pseudo"), input=split["train"], gt=split["gt"],
                   preset="demo", epochs=args.epochs, train_segmentation=True, seed=args.seed)
    summary = run(job)
    preset = resolve_preset(job, use_gpu=False)
    cam_w, affinity_w = summary["checkpoints"]["cam"], summary["checkpoints"]["affinity"]
    pseudo = {v: summary["metrics_full"][v] for v in ("cam", "cam_crf", "rw", "rw_crf")}

    train_corpus, _ = read_corpus(split["train"])
    train_rows = corpus_rows(train_corpus, split["gt"])
    full_output = join(args.work, "full")
    masks = with_masks(train_rows, split["gt"])
    full_w, _ = train_stage("deeplab", rows_dataset(masks), preset, names, full_output,
                            Init(cam_w), cpus_per_worker=0.5)
    deeplab = {"pseudo_labels": deeplab_on_val(summary["checkpoints"]["deeplab"], split,
                                               join(args.work, "val_pseudo"), preset.pipeline),
               "true_masks": deeplab_on_val(full_w, split, join(args.work, "val_full"), preset.pipeline)}
    deeplab["ratio"] = deeplab["pseudo_labels"]["miou"] / deeplab["true_masks"]["miou"]

    ablations = []
    grid = {"beta": ABLATIONS["beta"][:2]} if args.quick else ABLATIONS
    for setting, values in grid.items():
        for value in values:
            walk = replace(preset.walk, **{setting: value})
            output = join(args.work, f"ablation_{setting}_{value}")
            label_stage(rows_dataset(train_rows), replace(preset, walk=walk), cam_w, affinity_w, len(names),
                        output, "ablation", has_gpu=False, evaluate=True)
            metrics = evaluation(output, names)
            ablations.append({"setting": setting, "value": value,
                              **{v: metrics[v]["miou"] for v in ("rw", "rw_crf")}})

    result = {
        "command": "python bench/quality.py" + (" --quick" if args.quick else ""),
        "machine": describe_machine(),
        "images": {"train": split["train_images"], "val": split["val_images"]},
        "preset": to_dict(preset),
        "pseudo_labels_on_train": {v: m["miou"] for v, m in pseudo.items()},
        "pseudo_labels_per_class": {v: m["iou"] for v, m in pseudo.items()},
        "class_names": ["background", *names],
        "deeplab_on_val": {k: (v if k == "ratio" else {"miou": v["miou"], "iou": v["iou"]})
                           for k, v in deeplab.items()},
        "walk_defaults": {k: getattr(preset.walk, k) for k in ABLATIONS},
        "ablations": ablations,
        "seconds": round(time.perf_counter() - started, 1),
        "report_pictures": [],
    }
    folder = os.path.dirname(os.path.abspath(args.results))
    os.makedirs(folder, exist_ok=True)
    for uri in list_files(join(job.output, "report"), suffix=".png")[:REPORT_PICTURES]:
        name = "quality_report_" + uri.rsplit("/", 1)[-1]
        write_bytes(os.path.join(folder, name), read_bytes(uri))
        result["report_pictures"].append(name)
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    print(f"\nwrote {args.results}")
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The tables of the README's quality section."""
    q = result["pseudo_labels_on_train"]
    d = result["deeplab_on_val"]
    lines = [f"Pseudo labels on the {result['images']['train']} training images (mIoU %):", "",
             "| CAM | CAM+CRF | random walk | random walk+CRF |", "| ---: | ---: | ---: | ---: |",
             "| " + " | ".join(f"{100 * q[v]:.1f}" for v in ("cam", "cam_crf", "rw", "rw_crf")) + " |", "",
             f"DeepLab on the {result['images']['val']} validation images (mIoU %):", "",
             "| trained on pseudo labels | trained on true masks | ratio |", "| ---: | ---: | ---: |",
             f"| {100 * d['pseudo_labels']['miou']:.1f} | {100 * d['true_masks']['miou']:.1f} "
             f"| {100 * d['ratio']:.0f}% |", "",
             "Walk ablations on the training images (mIoU %; defaults: "
             + ", ".join(f"{k}={v}" for k, v in result["walk_defaults"].items()) + "):", "",
             "| setting | value | random walk | random walk+CRF |", "| --- | ---: | ---: | ---: |"]
    for a in result["ablations"]:
        lines.append(f"| {a['setting']} | {a['value']} | {100 * a['rw']:.1f} | {100 * a['rw_crf']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
