"""Label quality on the built-in synthetic corpora (birds, hard), each with a held-out validation split.

1. The labeling job (demo preset, --train-segmentation) runs on the training split: mIoU of CAM,
   CAM+CRF, random walk and random walk+CRF against the true masks of those images.
2. DeepLab trained on those pseudo labels, and DeepLab trained on the true masks (the upper
   bound; same backbone, same initialisation from the CAM network, same schedule), label the
   validation images; both are scored against the validation masks.
3. Ablations of the walk on the training split, with the trained networks fixed: beta, t,
   radius (at inference; AffinityNet is trained at 5) and the background alpha.

    python bench/quality.py                  # full, both corpora: ~15 min each on 2 CPU cores
    python bench/quality.py --labels-only    # step 1 on both: per-class IoU of the four variants
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

import ray

from bench.machine import describe_machine
from psa_ray.config import to_dict
from psa_ray.data import CORPORA, write_corpus
from psa_ray.io.keys import is_held_out
from psa_ray.io.classes import write_classes
from psa_ray.io.manifest_writer import write_manifest
from psa_ray.io.rows import CorpusRow
from psa_ray.io.inputs import read_corpus
from psa_ray.io.storage import join, list_files, read_bytes, write_bytes
from psa_ray.pipeline.labeling import LabelJob, resolve_preset, run
from psa_ray.pipeline.readers import corpus_rows, rows_dataset, with_masks
from psa_ray.pipeline.predict import predict
from psa_ray.pipeline.scoring import evaluation, score_folders
from psa_ray.pipeline.stages import label_stage, train_stage
from psa_ray.train.tasks import Init

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quality.json")
REPORT_PICTURES = 2   # report pictures of the pseudo labels copied beside the results
VARIANTS = ("cam", "cam_crf", "rw", "rw_crf")
# each corpus's size by default: 4/3 of the job's, so that the 3/4 that train match the job's corpus
DEFAULT_IMAGES = {name: config().num_images * 4 // 3 for name, config in CORPORA.items()}
ABLATIONS = {"beta": (2.0, 4.0, 16.0), "t": (16, 64, 1024), "radius": (3, 4), "alpha": (8.0, 32.0)}


def split_manifests(root: str, corpus: str, images: int | None, val_fraction: float, seed: int) -> dict[str, Any]:
    """Write the built-in corpus `corpus` (`psa_ray.data.CORPORA`), then train/val manifests
    (absolute image paths) beside it."""
    size = {} if images is None else {"num_images": images}
    manifest = write_corpus(root, CORPORA[corpus](seed=seed, **size))
    rows, _ = read_corpus(manifest)
    held_out = is_held_out([r.image_id for r in rows.rows], val_fraction)  # the jobs' held-out rule
    val_ids = {r.image_id for r, out in zip(rows.rows, held_out, strict=True) if out}
    train_ids = {r.image_id for r in rows.rows} - val_ids
    out = {"gt": join(root, "gt"), "class_names": list(rows.class_names)}
    for name, ids in (("train", train_ids), ("val", val_ids)):
        folder = join(root, name)
        write_manifest([CorpusRow(r.image_id, r.image, list(r.tags)) for r in rows.rows
                        if r.image_id in ids], join(folder, "manifest.parquet"))
        write_classes(rows.class_names, join(folder, "classes.txt"))
        out[name] = join(folder, "manifest.parquet")
        out[f"{name}_images"] = len(ids)
    return out


def deeplab_on_val(checkpoint: str, split: dict[str, Any], output: str, pipeline) -> dict[str, Any]:
    """DeepLab's labels for the validation images, scored against their true masks."""
    corpus, _ = read_corpus(split["val"])
    rows = [{"image_id": r.image_id, "image": r.image} for r in corpus.rows]
    predict(rows, checkpoint, output, pipeline, has_gpu=False)
    return score_folders(join(output, "labels"), split["gt"], len(split["class_names"]) + 1)


def corpus_quality(corpus: str, work: str, images: int | None, args: argparse.Namespace,
                   results_folder: str) -> dict[str, Any]:
    """Steps 1-3 on one built-in corpus (step 1 alone with --labels-only)."""
    started = time.perf_counter()
    split = split_manifests(join(work, "corpus"), corpus, images, args.val_fraction, args.seed)
    names = split["class_names"]
    job = LabelJob(output=join(work, "pseudo"), input=split["train"], gt=split["gt"],
                   preset="demo", epochs=args.epochs, train_segmentation=not args.labels_only, seed=args.seed)
    summary = run(job)
    preset = resolve_preset(job, use_gpu=False)
    pseudo = {v: summary["metrics_full"][v] for v in VARIANTS}
    result: dict[str, Any] = {
        "images": {"train": split["train_images"], "val": split["val_images"]},
        "preset": to_dict(preset),
        "pseudo_labels_on_train": {v: m["miou"] for v, m in pseudo.items()},
        "pseudo_labels_per_class": {v: m["iou"] for v, m in pseudo.items()},
        "class_names": ["background", *names],
        "warnings": summary["warnings"],
        "report_pictures": [],
    }
    for uri in list_files(join(job.output, "report"), suffix=".png")[:REPORT_PICTURES]:
        name = f"quality_{corpus}_" + uri.rsplit("/", 1)[-1]
        write_bytes(os.path.join(results_folder, name), read_bytes(uri))
        result["report_pictures"].append(name)
    if not args.labels_only:
        cam_w, affinity_w = summary["checkpoints"]["cam"], summary["checkpoints"]["affinity"]
        train_corpus, _ = read_corpus(split["train"])
        train_rows = corpus_rows(train_corpus, split["gt"])
        full_w, _ = train_stage("deeplab", rows_dataset(with_masks(train_rows, split["gt"])), preset, names,
                                join(work, "full"), Init(cam_w), cpus_per_worker=0.5)
        deeplab = {"pseudo_labels": deeplab_on_val(summary["checkpoints"]["deeplab"], split,
                                                   join(work, "val_pseudo"), preset.pipeline),
                   "true_masks": deeplab_on_val(full_w, split, join(work, "val_full"), preset.pipeline)}
        deeplab["ratio"] = deeplab["pseudo_labels"]["miou"] / deeplab["true_masks"]["miou"]
        ablations = []
        for setting, values in ({"beta": ABLATIONS["beta"][:2]} if args.quick else ABLATIONS).items():
            for value in values:
                output = join(work, f"ablation_{setting}_{value}")
                label_stage(rows_dataset(train_rows), replace(preset, walk=replace(preset.walk, **{setting: value})),
                            cam_w, affinity_w, len(names), output, "ablation", has_gpu=False, evaluate=True)
                metrics = evaluation(output, names)
                ablations.append({"setting": setting, "value": value,
                                  **{v: metrics[v]["miou"] for v in ("rw", "rw_crf")}})
        result["deeplab_on_val"] = {k: (v if k == "ratio" else {"miou": v["miou"], "iou": v["iou"]})
                                    for k, v in deeplab.items()}
        result["walk_defaults"] = {k: getattr(preset.walk, k) for k in ABLATIONS}
        result["ablations"] = ablations
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default=f"/tmp/psa_quality_{uuid.uuid4().hex[:8]}", help="scratch folder")
    p.add_argument("--corpus", nargs="+", choices=sorted(CORPORA), default=["birds", "hard"],
                   help="the built-in corpora to measure, one after the other")
    p.add_argument("--images", type=int,
                   help="corpus size (default: " + ", ".join(f"{n} {name}" for name, n in DEFAULT_IMAGES.items())
                   + "); 3/4 train, 1/4 val")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--epochs", type=int, help="override every network's epochs")
    p.add_argument("--labels-only", action="store_true",
                   help="step 1 only: the pseudo labels' per-class IoU (no DeepLab, no ablations)")
    p.add_argument("--quick", action="store_true", help="40 images, 1 epoch, two ablations")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.epochs = min(args.images or 40, 40), args.epochs or 1
    folder = os.path.dirname(os.path.abspath(args.results))
    os.makedirs(folder, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    command = " ".join(["python bench/quality.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"command": command, "machine": describe_machine(), "corpora": {}}
    for corpus in args.corpus:
        result["corpora"][corpus] = corpus_quality(corpus, join(args.work, corpus),
                                                   args.images or DEFAULT_IMAGES[corpus], args, folder)
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    print(f"\nwrote {args.results}")
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The tables of bench/README.md's "Label quality" section, per corpus."""
    lines = []
    for corpus, r in result["corpora"].items():
        q, per_class = r["pseudo_labels_on_train"], r["pseudo_labels_per_class"]
        lines += [f"**{corpus}**: pseudo labels on the {r['images']['train']} training images (IoU %):", "",
                  "| class | CAM | CAM+CRF | random walk | random walk+CRF |", "| --- | ---: | ---: | ---: | ---: |",
                  "| **mIoU** | " + " | ".join(f"**{100 * q[v]:.1f}**" for v in VARIANTS) + " |"]
        for c, name in enumerate(r["class_names"]):
            lines.append(f"| {name} | " + " | ".join(_percent(per_class[v][c]) for v in VARIANTS) + " |")
        lines += ["", f"random walk / CAM: {q['rw'] / q['cam']:.2f}x; warnings: {len(r['warnings'])}", ""]
        if "deeplab_on_val" in r:
            d = r["deeplab_on_val"]
            lines += [f"DeepLab on the {r['images']['val']} validation images (mIoU %):", "",
                      "| trained on pseudo labels | trained on true masks | ratio |", "| ---: | ---: | ---: |",
                      f"| {100 * d['pseudo_labels']['miou']:.1f} | {100 * d['true_masks']['miou']:.1f} "
                      f"| {100 * d['ratio']:.0f}% |", "",
                      "Walk ablations on the training images (mIoU %; defaults: "
                      + ", ".join(f"{k}={v}" for k, v in r["walk_defaults"].items()) + "):", "",
                      "| setting | value | random walk | random walk+CRF |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {a['setting']} | {a['value']} | {100 * a['rw']:.1f} | {100 * a['rw_crf']:.1f} |"
                      for a in r["ablations"]]
            lines.append("")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
