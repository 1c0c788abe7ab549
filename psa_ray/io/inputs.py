"""What a job reads: a tagged corpus to label (`read_corpus`: a manifest or a PASCAL VOC 2012
folder) and untagged images to predict (`read_images`: a manifest or a folder of images), both
checked by the rules of `io.rows` with the same error codes."""
from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from psa_ray.io.manifest import MANIFEST_FORMATS, format_of, manifest_base, manifest_parts, part_records, read_manifest
from psa_ray.io.rows import Corpus, ManifestError, RowError, all_rejected_message, validate_records
from psa_ray.io.storage import list_files
from psa_ray.io.voc import read_voc, voc_root


def read_corpus(input_uri: str, *, classes: list[str] | str | None = None, split: str = "train",
                endpoint_url: str | None = None) -> tuple[Corpus, list[RowError]]:
    """The usable rows of a manifest file or a VOC 2012 folder, and the rejected ones.

    A manifest is a file or a folder/prefix of manifest files of one format (a sharded
    manifest). Everything is read into memory: the labeling job streams manifests through Ray
    Data instead (`psa_ray.pipeline.corpus`), with the same parser and checks.
    classes: manifests only (see resolve_classes). split: VOC only, "train", "val", "trainval"
    or the path/URI of an id list. Raises ManifestError for problems with the whole input.
    """
    root = None if format_of(input_uri) else voc_root(input_uri, endpoint_url)
    if root is not None:
        return read_voc(root, split, classes, endpoint_url)
    return read_manifest(input_uri, classes, endpoint_url)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".avif")
FOLDER_SEPARATOR = "__"  # stands for '/' in the ids of images in subfolders


def _folder_records(folder: str, endpoint_url: str | None) -> Iterator[dict[str, Any]]:
    """One record per image file under a folder/prefix; id: its path below it, no suffix."""
    prefix = folder.rstrip("/") + "/"
    images = (uri for uri in list_files(folder, endpoint_url=endpoint_url) if uri.lower().endswith(IMAGE_SUFFIXES))
    for number, uri in enumerate(images, 1):
        yield {"image_id": posixpath.splitext(uri[len(prefix):])[0].replace("/", FOLDER_SEPARATOR),
               "image": uri, "where": f"file {number}"}


def read_images(input_uri: str, endpoint_url: str | None = None) -> tuple[list[dict[str, str]], list[RowError]]:
    """Untagged images to label with a trained network: rows {image_id, image URI} and the
    rejected ones (stage "manifest"), with the checks and error codes of `read_corpus`.

    input_uri: a manifest (.parquet/.jsonl/.csv with columns image_id and image; tags are not
    needed) or a folder/prefix of images (ids from the file names, '/' in subfolder paths written
    as '__'). Raises ManifestError when nothing can be read.
    """
    if format_of(input_uri):
        parts = manifest_parts(input_uri, endpoint_url, tagged=False)
        records: Iterable[dict[str, Any]] = (
            r for part in parts for batch in part_records(part, endpoint_url=endpoint_url) for r in batch)
        base = manifest_base(input_uri)
    else:
        records, base = _folder_records(input_uri, endpoint_url), input_uri
    rows, errors = validate_records(records, None, base)
    if not rows and not errors:
        raise ManifestError(f"no images in {input_uri} (a manifest ends in "
                            f"{', '.join('.' + f for f in MANIFEST_FORMATS)}; a folder holds "
                            f"{', '.join(IMAGE_SUFFIXES)} files)")
    if not rows:
        raise ManifestError(all_rejected_message(len(errors), Counter(e.error for e in errors),
                                                 errors[0].message, input_uri))
    return [{"image_id": r.image_id, "image": r.image} for r in rows], errors
