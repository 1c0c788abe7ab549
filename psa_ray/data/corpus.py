"""Writing a built-in corpus to storage: each corpus module registers its config class, class
names and sample maker, and `write_corpus` picks them by the type of the config it is given."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from psa_ray.io.images import encode_png
from psa_ray.io.manifest import CorpusRow, write_classes, write_manifest
from psa_ray.io.palette import encode_label_png
from psa_ray.io.storage import join, write_bytes

if TYPE_CHECKING:
    from psa_ray.data.hard import HardConfig
    from psa_ray.data.synthetic import Sample, SyntheticConfig


@dataclass(frozen=True)
class _Kind:
    """A registered corpus: its class names (label k is class_names[k - 1]) and sample maker."""

    class_names: tuple[str, ...]
    make_sample: Callable[[int, Any], Sample]


_KINDS: dict[type, _Kind] = {}


def register(config_type: type, class_names: tuple[str, ...], make_sample: Callable[[int, Any], Sample]) -> None:
    """Make write_corpus write corpora of config_type with these class names and samples."""
    _KINDS[config_type] = _Kind(class_names, make_sample)


def write_corpus(root_uri: str, config: SyntheticConfig | HardConfig, endpoint_url: str | None = None) -> str:
    """Write images/<id>.png, gt/<id>.png (palette), manifest.parquet and classes.txt under root_uri.

    Existing files are overwritten; the same config gives the same bytes. Returns the manifest URI.
    """
    kind = _KINDS.get(type(config))
    if kind is None:
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
