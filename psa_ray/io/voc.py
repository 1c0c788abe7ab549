"""PASCAL VOC 2012 folders as an input corpus: ids from ImageSets/Segmentation/<split>.txt, tags
from Annotations/<id>.xml (difficult objects included), images JPEGImages/<id>.jpg; rows checked
as a manifest's are (`io.rows.validate_records`), with `missing_annotation` / `bad_annotation`
for annotations that are not there or do not parse."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

from psa_ray.io.classes import read_text, resolve_classes
from psa_ray.io.rows import Corpus, ManifestError, RowError, RowProblem, id_problem, usable_corpus, validate_records
from psa_ray.io.storage import exists, join, read_bytes

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
VOC_SPLITS = ("train", "val", "trainval")


def voc_root(uri: str, endpoint_url: str | None = None) -> str | None:
    """The VOC2012 folder for `.../VOC2012` or `.../VOCdevkit` (None if neither holds
    ImageSets/Segmentation)."""
    for root in (uri.rstrip("/"), join(uri, "VOC2012")):
        if exists(join(root, "ImageSets", "Segmentation"), endpoint_url):
            return root
    return None


def _voc_tags(root: str, image_id: str, endpoint_url: str | None) -> list[str] | RowProblem:
    """Object names in Annotations/<image_id>.xml (difficult objects included), or the problem."""
    uri = join(root, "Annotations", f"{image_id}.xml")
    try:
        tree = ET.fromstring(read_bytes(uri, endpoint_url))
    except FileNotFoundError:
        return RowProblem("missing_annotation", f"no annotation {uri}")
    except ET.ParseError as e:
        return RowProblem("bad_annotation", f"annotation {uri} is not valid XML: {e}")
    except OSError as e:
        return RowProblem("bad_annotation", f"annotation {uri} is unreadable: {e}")
    return [(obj.findtext("name") or "").strip() for obj in tree.findall("object")]


def read_voc(root: str, split: str, classes: list[str] | str | None,
              endpoint_url: str | None) -> tuple[Corpus, list[RowError]]:
    if classes is not None and resolve_classes(classes, root, endpoint_url) != VOC_CLASSES:
        raise ManifestError(f"{root} is a VOC folder: its classes are the 20 VOC classes, "
                            "do not pass other classes")
    ids_uri = join(root, "ImageSets", "Segmentation", f"{split}.txt") if split in VOC_SPLITS else split
    ids = [line.split()[0] for line in read_text(ids_uri, "VOC split file", endpoint_url).splitlines()
           if line.strip()]
    fetch = sorted({i for i in ids if id_problem(i) is None})
    with ThreadPoolExecutor(max_workers=16) as pool:
        tags = dict(zip(fetch, pool.map(lambda i: _voc_tags(root, i, endpoint_url), fetch), strict=True))
    records = []
    for number, image_id in enumerate(ids, 1):
        record = {"image_id": image_id, "image": f"JPEGImages/{image_id}.jpg",
                  "tags": tags.get(image_id), "where": f"line {number} of {ids_uri}"}
        if isinstance(record["tags"], RowProblem):
            record["problem"] = record.pop("tags")
        records.append(record)
    rows, errors = validate_records(records, VOC_CLASSES, root)
    return usable_corpus(rows, errors, list(VOC_CLASSES), ids_uri)
