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
