"""Connecting a job to Ray, and what the cluster it runs on has."""
from __future__ import annotations

import os
from typing import NamedTuple

import ray

from psa_ray.pipeline.progress import quiet_ray, ray_logging, worker_env


class ClusterShape(NamedTuple):
    """has_gpu: the run's actors and workers use GPUs; small: a CPU-only cluster of under 4 CPUs
    (a laptop: the demo preset's resources, half-CPU training workers)."""

    has_gpu: bool
    small: bool


def connect(endpoint_url: str | None = None, verbose: bool = False) -> None:
    """`ray.init` for a job: the cluster in RAY_ADDRESS (or a local Ray), with the S3 endpoint
    override (`endpoint_url`, else the driver's AWS_ENDPOINT_URL) passed on to every worker; Ray's
    own logs and progress only when `verbose` (`progress.quiet_ray`)."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL",) if k in os.environ} | worker_env(verbose)
    ray.init(runtime_env={"env_vars": env} if env else None, logging_config=ray_logging(verbose))
    quiet_ray(verbose)


def cluster_shape(use_gpu: bool | None) -> ClusterShape:
    """The shape of the connected cluster for a run. use_gpu None: GPUs if the cluster has some
    now; an autoscaling cluster may have no GPU node yet, so --use-gpu asks for them regardless."""
    resources = ray.cluster_resources()
    has_gpu = use_gpu if use_gpu is not None else resources.get("GPU", 0) > 0
    return ClusterShape(has_gpu, resources.get("CPU", 1) < 4 and not has_gpu)

