"""Class lists: a corpus's class names (`classes=` or a classes.txt, one name per line, no
background), checked, and written."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from psa_ray.io.rows import ManifestError
from psa_ray.io.storage import FILE_SCHEME, S3_SCHEME, exists, join, parent, read_bytes, write_bytes

CSV_TAG_SEPARATOR = "|"  # between the tags of a CSV manifest row, so no class name holds it
MAX_CLASSES = 254  # labels are uint8: 0 background, 1..C classes, 255 ignore


def read_text(uri: str, what: str, endpoint_url: str | None) -> str:
    """A UTF-8 text file of the input (a class list, a VOC split file); ManifestError naming
    `what` if it cannot be read."""
    try:
        return read_bytes(uri, endpoint_url).decode("utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{what} not found: {uri}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{what} {uri} is not UTF-8 text") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{what} {uri} is unreadable: {e}") from None


def _is_file_reference(classes: str) -> bool:
    return (classes.startswith((S3_SCHEME, FILE_SCHEME)) or classes.endswith(".txt")
            or os.path.isfile(classes))


def resolve_classes(classes: list[str] | str | None, manifest_uri: str,
                    endpoint_url: str | None = None) -> list[str]:
    """Class names from a list, a classes.txt path/URI, a comma-separated string, or (None)
    classes.txt beside the manifest. Blank entries are ignored; raises ManifestError."""
    if classes is None:
        source = join(parent(manifest_uri), "classes.txt")
        if not exists(source, endpoint_url):
            raise ManifestError(f"no class names for {manifest_uri}: put a classes.txt beside it "
                                "(one name per line) or pass classes")
        names = read_text(source, f"classes file for {manifest_uri}", endpoint_url).splitlines()
    elif isinstance(classes, str) and _is_file_reference(classes):
        source = classes
        names = read_text(source, f"classes file for {manifest_uri}", endpoint_url).splitlines()
    else:
        source = "the classes option"
        names = classes.split(",") if isinstance(classes, str) else list(classes)
    names = [str(n).strip() for n in names if n is not None and str(n).strip()]
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    problem = None
    if not names:
        problem = "no class names"
    elif duplicates:
        problem = f"duplicate class names {', '.join(duplicates)}"
    elif any(n.lower() == "background" for n in names):
        problem = "'background' is listed; leave it out (label 0 is background)"
    elif any(CSV_TAG_SEPARATOR in n for n in names):
        problem = f"class names must not contain '{CSV_TAG_SEPARATOR}'"
    elif len(names) > MAX_CLASSES:
        problem = f"{len(names)} classes; at most {MAX_CLASSES} fit uint8 labels"
    if problem:
        raise ManifestError(f"{problem} in {source} (for {manifest_uri})")
    return names


def write_classes(class_names: Sequence[str], uri: str, endpoint_url: str | None = None) -> None:
    """classes.txt: one name per line."""
    write_bytes(uri, "".join(f"{n}\n" for n in class_names).encode(), endpoint_url)
