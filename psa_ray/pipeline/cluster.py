"""Connecting a job to Ray."""
from __future__ import annotations

import os

import ray


def connect() -> None:
    """`ray.init` for a job: the cluster in RAY_ADDRESS (or a local Ray), with the driver's S3
    endpoint override (AWS_ENDPOINT_URL, e.g. from --endpoint-url) passed on to every worker."""
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL",) if k in os.environ}
    ray.init(runtime_env={"env_vars": env} if env else None)
