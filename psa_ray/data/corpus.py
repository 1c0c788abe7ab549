"""What the built-in corpora share: a sample, the way a sample is drawn (`CorpusKind`, which each
corpus fills in with its own background, distractors and objects) and `write_corpus`, which writes
the corpus of any config whose `kind` is a `CorpusKind`."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from psa_ray.data.drawing import blur
from psa_ray.io.images import encode_png
from psa_ray.io.classes import write_classes
from psa_ray.io.manifest_writer import write_manifest
from psa_ray.io.rows import CorpusRow
from psa_ray.io.palette import encode_label_png
from psa_ray.io.storage import join, write_bytes


@dataclass
class Sample:
    """One image: id, RGB uint8 [H,W,3], mask uint8 [H,W] (0, 1..C), tags (class names)."""

    image_id: str
    image: np.ndarray
    mask: np.ndarray
    tags: list[str]


class CorpusConfig(Protocol):
    """The settings every built-in corpus's config has (`SyntheticConfig`, `HardConfig`)."""

    @property
    def num_images(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def min_size(self) -> int: ...
    @property
    def max_size(self) -> int: ...
    @property
    def max_objects(self) -> int: ...
    @property
    def noise_std(self) -> float: ...
    @property
    def max_layout_attempts(self) -> int: ...
    @property
    def kind(self) -> CorpusKind: ...


# background(rng, height, width, config) -> canvas [H,W,3] float
Background = Callable[[np.random.Generator, int, int, Any], np.ndarray]
# paint_distractors(rng, canvas, yy, xx, config): draws untagged shapes onto canvas in place
Distractors = Callable[[np.random.Generator, np.ndarray, np.ndarray, np.ndarray, Any], None]
# layout(rng, yy, xx, canvas, max_objects, config) -> (colours [H,W,3], mask [H,W] uint8, acceptable)
Layout = Callable[[np.random.Generator, np.ndarray, np.ndarray, np.ndarray, int, Any],
                  tuple[np.ndarray, np.ndarray, bool]]


@dataclass(frozen=True)
class CorpusKind:
    """A built-in corpus: its class names (label k is class_names[k - 1]), image id prefix, and
    how its images are painted."""

    class_names: tuple[str, ...]
    id_prefix: str
    background: Background
    paint_distractors: Distractors
    layout: Layout

    def make_sample(self, index: int, config: CorpusConfig) -> Sample:
        """The index-th image of the corpus given by config.seed (deterministic): numpy Generators
        seeded by (seed, index, 0) for the image and (seed, index, 1) for the distractors."""
        rng = np.random.default_rng([config.seed, index, 0])
        height, width = (int(n) for n in rng.integers(config.min_size, config.max_size + 1, 2))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
        canvas = self.background(rng, height, width, config)
        # distractors draw from their own stream: the rest of the image does not depend on them
        self.paint_distractors(np.random.default_rng([config.seed, index, 1]), canvas, yy, xx, config)
        for attempt in range(config.max_layout_attempts):
            # fewer objects as attempts fail, so crowded layouts give way instead of looping
            max_objects = max(1, config.max_objects - attempt // 20)
            colours, mask, acceptable = self.layout(rng, yy, xx, canvas, max_objects, config)
            if acceptable:
                break
        else:
            raise RuntimeError(f"no acceptable layout for image {index} in {config.max_layout_attempts} "
                               f"attempts; loosen the visibility limits or shrink the objects")
        canvas = np.where((mask > 0)[..., None], colours, canvas)
        image = blur(canvas) + rng.normal(0.0, config.noise_std, canvas.shape)
        tags = [self.class_names[k - 1] for k in np.unique(mask) if k > 0]
        return Sample(image_id=f"{self.id_prefix}_{index:06d}",
                      image=np.clip(np.rint(image), 0, 255).astype(np.uint8), mask=mask, tags=tags)


def write_corpus(root_uri: str, config: CorpusConfig, endpoint_url: str | None = None) -> str:
    """Write images/<id>.png, gt/<id>.png (palette), manifest.parquet and classes.txt under root_uri.

    Existing files are overwritten; the same config gives the same bytes. Returns the manifest URI.
    """
    kind = getattr(config, "kind", None)
    if not isinstance(kind, CorpusKind):
        raise TypeError(f"no built-in corpus is made from a {type(config).__name__}")
    rows = []
    for i in range(config.num_images):
        sample = kind.make_sample(i, config)
        image_path = f"images/{sample.image_id}.png"
        write_bytes(join(root_uri, image_path), encode_png(sample.image), endpoint_url=endpoint_url)
        write_bytes(join(root_uri, "gt", f"{sample.image_id}.png"), encode_label_png(sample.mask),
                    endpoint_url=endpoint_url)
        rows.append(CorpusRow(image_id=sample.image_id, image=image_path, tags=sample.tags))
    write_classes(list(kind.class_names), join(root_uri, "classes.txt"), endpoint_url=endpoint_url)
    manifest_uri = join(root_uri, "manifest.parquet")
    write_manifest(rows, manifest_uri, format="parquet", endpoint_url=endpoint_url)
    return manifest_uri
