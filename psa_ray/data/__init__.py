"""The built-in synthetic corpora (no Ray): images, image-level tags and ground-truth masks.

CORPORA, the one registry of them, maps a corpus name to its config class; a config's `kind`
says how its corpus is drawn, and write_corpus writes the corpus of any of them.
"""
from __future__ import annotations

from psa_ray.data.corpus import Sample, write_corpus
from psa_ray.data.hard import HardConfig
from psa_ray.data.synthetic import CLASS_NAMES, SyntheticConfig, make_sample

CORPORA: dict[str, type] = {"birds": SyntheticConfig, "hard": HardConfig}

__all__ = ["CLASS_NAMES", "CORPORA", "HardConfig", "Sample", "SyntheticConfig", "make_sample", "write_corpus"]
