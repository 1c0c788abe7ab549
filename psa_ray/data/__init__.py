"""The built-in synthetic corpus (no Ray): images, image-level tags and ground-truth masks."""
from __future__ import annotations

from psa_ray.data.synthetic import (
    CLASS_NAMES, Sample, SyntheticConfig, make_sample, split_ids, write_corpus)

__all__ = ["CLASS_NAMES", "Sample", "SyntheticConfig", "make_sample", "split_ids",
           "write_corpus"]
