"""psa_ray/pipeline/ray_compat.py holds workarounds for one Ray version: on another, re-check them."""
from __future__ import annotations

import os

import ray

from psa_ray.pipeline.ray_compat import RAY_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_installed_ray_is_the_one_the_workarounds_were_made_for():
    assert ray.__version__ == RAY_VERSION, (
        f"Ray {ray.__version__} is installed, the workarounds in psa_ray/pipeline/ray_compat.py are for "
        f"{RAY_VERSION}: re-check each (and the fractional CPU requests it names), then update RAY_VERSION, "
        ".ci/constraints.txt and pyproject.toml")


def test_the_pin_is_the_same_everywhere():
    for name, pin in ((".ci/constraints.txt", f"ray=={RAY_VERSION}"), ("pyproject.toml", f"]=={RAY_VERSION}")):
        with open(os.path.join(REPO, name)) as f:
            assert pin in f.read(), f"{name} does not pin Ray {RAY_VERSION}"
