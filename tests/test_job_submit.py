"""The cluster path of the main job: `ray job submit` to a real Ray head started with `ray start`
(conftest's `LocalRayCluster`: its own temp dir and ports, torn down by killing exactly its
processes; `ray stop` would kill every Ray process on the machine).

The head runs as the manifests in infra/ set a cluster up: token authentication on
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN in every node's environment, as KubeRay's
`authOptions: {mode: token}` does) and S3 credentials in the nodes' environment (the Secret
psa-ray-s3). A client without the token is refused; one with it labels the corpus (with given
networks: training runs in tests/test_pipeline.py and tests/test_train.py); and neither
the token nor the S3 keys end up in anything the run wrote."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import boto3
import pytest
from ray.job_submission import JobSubmissionClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's CLI, from ray[default]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _files(folder: str) -> dict[str, bytes]:
    """{path: bytes} of every regular file under folder (sockets and links skipped)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    found[path] = f.read()
    return found


def _objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    """{s3://bucket/key: bytes} of every object in the bucket."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {f"s3://{bucket}/{k}": s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _leaks(texts: dict[str, bytes], secret_values: dict[str, str]) -> list[str]:
    return [f"{what} in {where}" for where, data in texts.items()
            for what, value in secret_values.items() if value.encode() in data]


@pytest.mark.slow
def test_label_job_through_ray_job_submit(s3_server, trained_checkpoints, local_ray_cluster):
    token = secrets.token_hex(32)  # the form `ray get-auth-token --generate` makes
    # Fresh random keys: fixed ones would also be found in the repository copy the job runs from.
    s3_keys = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
               "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    bucket = f"psa-secure-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    local_ray_cluster.use_token_auth(token)
    local_ray_cluster.env.update(s3_keys, AWS_ENDPOINT_URL=s3_server)  # as the Secret psa-ray-s3 does
    head = local_ray_cluster.start(num_cpus=2, job_server=True)
    out = f"s3://{bucket}/run"
    submit = [RAY, "job", "submit", "--address", head.job_server, "--working-dir", REPO, "--",
              sys.executable, "jobs/label_dataset.py", "--output", out,
              "--synthetic-images", "8", "--cam-checkpoint", trained_checkpoints["cam"],
              "--affinity-checkpoint", trained_checkpoints["affinity"]]
    jobs = JobSubmissionClient(head.job_server, headers={"Authorization": f"Bearer {token}"})

    anonymous = {k: v for k, v in local_ray_cluster.env.items() if k not in AUTH_VARS}
    refused = subprocess.run(submit, env=anonymous, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "AuthenticationError: Authentication required: Unauthorized: Missing authentication token" \
        in refused.stderr, refused.stderr[-3000:]
    assert jobs.list_jobs() == [] and _objects(s3_server, bucket) == {}, "the refused job must not run"

    done = subprocess.run(submit, env=local_ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    (job,) = jobs.list_jobs()
    assert job.status == "SUCCEEDED"
    outputs = _objects(s3_server, bucket)
    labels = [k for k in outputs if k.startswith(f"{out}/labels/")]
    assert len(labels) == 8 and all(k.endswith(".png") for k in labels)
    assert json.loads(outputs[f"{out}/run.json"])["counts"]["labeled"] == 8

    # Everything the run wrote: the client's output (the job's streamed logs), `ray job logs`,
    # the output prefix, and the head's whole Ray temp dir (session logs of the GCS, raylet,
    # dashboard, job supervisor, driver and workers; the uploaded working dir).
    logs = {"submit output": (done.stdout + done.stderr + refused.stdout + refused.stderr).encode(),
            "ray job logs": jobs.get_job_logs(job.submission_id).encode()}
    ray_files = _files(head.temp_dir)
    assert any("/logs/job-driver-" in p and b"corpus: 8 images" in data for p, data in ray_files.items()), \
        "the scan reads the session logs, the driver's included"
    assert _leaks({**logs, **outputs, **ray_files}, {"the Ray token": token, **s3_keys}) == []
    # The pods' root file system is read-only (infra/k8s): Ray and the job wrote nothing to HOME.
    assert os.listdir(local_ray_cluster.env["HOME"]) == []
