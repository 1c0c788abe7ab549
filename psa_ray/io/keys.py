"""Image id keys: the 16-byte BLAKE2b digest of an image id (`id_key`), and the numpy arithmetic
on arrays of them that duplicate checks, the training sample, the held-out share and resume rest
on. Keys are numpy `S16` (their byte order is their order); a prefix is a key's first 8 bytes as
uint64."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

KEY = "S16"  # numpy dtype of id keys


def id_key(image_id: str) -> bytes:
    """A 16-byte digest of an image id: the key of joins, duplicate checks and sampling."""
    return hashlib.blake2b(image_id.encode("utf-8"), digest_size=16).digest()


def key_array(image_ids: list[str]) -> pa.Array:
    """The keys of image ids as an Arrow binary(16) column."""
    return pa.array([id_key(i) for i in image_ids], pa.binary(16))


def key_column(batch: pa.Table) -> np.ndarray:
    """The `key` column of a batch as a numpy S16 array."""
    column = batch.column("key").combine_chunks()
    if column.type != pa.binary(16):  # after a numpy-format step: variable-size binary
        column = column.cast(pa.binary(16))
    if len(column) == 0:
        return np.zeros(0, KEY)
    data = np.frombuffer(column.buffers()[1], dtype=KEY)
    return data[column.offset: column.offset + len(column)]


def key_prefixes(batch: pa.Table) -> np.ndarray:
    """The first 8 bytes of each key of a batch as uint64 (their order is the keys' order)."""
    keys = key_column(batch)
    return np.frombuffer(keys.tobytes(), ">u8")[::2].astype(np.uint64)


def repeated_values(values: np.ndarray) -> np.ndarray:
    """The values that occur more than once in a sorted array."""
    repeated = values[1:] == values[:-1]
    return np.unique(values[1:][repeated])


def unique_sorted(keys: np.ndarray) -> np.ndarray:
    """A sorted array without its repeats."""
    if keys.size == 0:
        return keys
    first = np.ones(keys.size, bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first]


def is_member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """[n] bool: which keys are in sorted_keys."""
    if sorted_keys.size == 0:
        return np.zeros(keys.size, bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    result: np.ndarray = sorted_keys[at] == keys
    return result


# --------------------------------------------------------------------------- the training sample

def sample_rule(train_images: int) -> str:
    return (f"the {train_images} usable images of smallest BLAKE2b-128 digest of image_id "
            "(psa_ray.io.keys.id_key); all images when the corpus has fewer")


def training_sample(prefixes: np.ndarray, train_images: int) -> dict[str, Any]:
    """The training sample over the sorted unique key prefixes of the usable rows: its size, rule
    and threshold (hex; a key is in the sample when it is <= the threshold, i.e. when its prefix
    is at most the size-th smallest: one image more per prefix tie at that place)."""
    size = min(train_images, len(prefixes))
    return {"train_images": train_images, "size": int(size), "rule": sample_rule(train_images),
            "threshold": (int(prefixes[size - 1]).to_bytes(8, "big") + b"\xff" * 8).hex() if size else ""}


def held_out_rule(fraction: float) -> str:
    return (f"the images whose BLAKE2b-128 digest of image_id ends in a byte below "
            f"{held_out_byte(fraction)} (~{100 * fraction:g}% of the training sample)")


def held_out_byte(fraction: float) -> int:
    """A row is held out when the last byte of its key is below this (independent of the sample,
    which is decided by the first 8 bytes)."""
    return round(256 * fraction)


def is_held_out(image_ids: list[str], fraction: float) -> np.ndarray:
    """[n] bool: which ids are held out at `fraction` (`held_out_rule`): the one rule of every job
    (the labeling job's CAM tag AP, the train jobs' validation share, bench/quality.py)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return np.zeros(len(image_ids), bool)
    keys = np.array([id_key(i) for i in image_ids], dtype=KEY)
    return kept_keys(keys, held_out=fraction, only_held_out=True)


def kept_keys(keys: np.ndarray, *, threshold: bytes | None = None, exclude: np.ndarray | None = None,
              include: np.ndarray | None = None, held_out: float = 0.0, only_held_out: bool = False) -> np.ndarray:
    """[n] bool: which keys pass every filter given: held_out > 0 leaves out the held-out keys
    (`held_out_rule`), or with only_held_out keeps them alone; threshold keeps the keys <= it (the
    sample); exclude / include (sorted keys) leave out the keys (not) among them."""
    keep = np.ones(keys.size, bool)
    if held_out > 0:
        is_held_out = np.frombuffer(keys.tobytes(), np.uint8)[15::16] < held_out_byte(held_out)
        keep &= is_held_out if only_held_out else ~is_held_out
    if threshold is not None:
        keep &= keys <= np.array(threshold, KEY)
    if exclude is not None:
        keep &= ~is_member(keys, exclude)
    if include is not None:
        keep &= is_member(keys, include)
    return keep
