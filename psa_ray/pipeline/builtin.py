"""The built-in corpora (`data.CORPORA`) as a job's input: written once under the output, reused
by the runs that make the same corpus, refused to the others."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from typing import Any

from psa_ray.data import write_corpus
from psa_ray.errors import UserError
from psa_ray.io.storage import exists, join, read_bytes, write_bytes
from psa_ray.pipeline.writers import read_table

BUILTIN_RECORD = "builtin.json"  # beside a built-in corpus: the (kind, seed, size) it was made with


def builtin_corpus(root: str, kind: str, config: Any) -> str:
    """The manifest of the built-in corpus `kind` (`data.CORPORA`) made with `config` under root:
    written where no corpus is, reused where `builtin.json` beside it records the same kind, seed
    and size (or, without a record, where the corpus is the one `config` makes: `_made_with`);
    otherwise a UserError, so that no job writes over the corpus of another run (whose rows,
    labels and checkpoints would stay behind, no longer matching the images)."""
    record = {"kind": kind, "seed": config.seed, "num_images": config.num_images}
    manifest, saved = join(root, "manifest.parquet"), join(root, BUILTIN_RECORD)
    found = json.loads(read_bytes(saved)) if exists(saved) else None
    if found is None and exists(manifest):  # written before the record was kept, or not built in
        if not _made_with(root, config):
            raise UserError(f"{root} holds a corpus that is not the built-in corpus {_described(record)}; "
                            f"pass --input {manifest} to use it, or another --output")
        found = record
        write_bytes(saved, json.dumps(record).encode())
    if found is not None and found != record:
        raise UserError(f"{root} holds the built-in corpus {_described(found)}, not {_described(record)}: "
                        "pass the options it was made with (--corpus, --seed, --synthetic-images) or another --output")
    if found is None:
        write_bytes(saved, json.dumps(record).encode())  # first: an interrupted write is redone the same
    if not exists(manifest):
        write_corpus(root, config)  # writes the manifest last
    return manifest


def _made_with(root: str, config: Any) -> bool:
    """Whether the corpus under root is the one `config` makes: as many rows, and its first image
    the same bytes (each image is drawn from the corpus kind, its seed and its index alone)."""
    if read_table(join(root, "manifest.parquet"), columns=["image_id"]).num_rows != config.num_images:
        return False
    with tempfile.TemporaryDirectory() as first:
        write_corpus(first, replace(config, num_images=1))
        [name] = os.listdir(os.path.join(first, "images"))
        ours = join(root, "images", name)
        with open(os.path.join(first, "images", name), "rb") as f:
            return exists(ours) and read_bytes(ours) == f.read()


def _described(record: dict[str, Any]) -> str:
    return f"{record['kind']!r} ({record['num_images']} images, seed {record['seed']})"
