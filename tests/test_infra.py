"""Deployment files (infra/): manifests the KubeRay API accepts, commands the job accepts, worker
groups that can host the pipeline's resource requests, one Ray version everywhere."""
from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.job.cli import submit as job_submit_cli

from psa_ray.config import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(REPO, "infra")
CRD_DIR = os.path.join(REPO, "..", "shared", "kuberay-crds")  # CI has shared/ beside the clone
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 1-2 MB


def _load(*path: str) -> Any:
    with open(os.path.join(REPO, *path)) as f:
        return yaml.load(f, Loader=Loader)


def _read(*path: str) -> str:
    with open(os.path.join(REPO, *path)) as f:
        return f.read()


# --- KubeRay manifests against the CRDs' OpenAPI schemas ---------------------------------------

def _strict(node: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation (kubectl's
    default): unknown fields are errors, and `nullable` admits null. jsonschema ignores the
    other OpenAPI extensions (x-kubernetes-*; int-or-string fields are already anyOf int/string).
    """
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if k not in ("nullable", "properties")}
    if "properties" in node:  # a map of field names, not a schema
        out["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") else out


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    path = os.path.join(CRD_DIR, CRD_FILES[kind])
    if not os.path.isfile(path):
        pytest.fail(f"KubeRay CRD {os.path.abspath(path)} is missing: the manifests cannot be validated. "
                    "Put shared/kuberay-crds/ beside the repository (as in CI).")
    with open(path) as f:
        crd = yaml.load(f, Loader=Loader)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft202012Validator(_strict(schema))


def _schema_errors(manifest: dict) -> list[str]:
    errors = _validator(manifest["kind"]).iter_errors(manifest)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def _operator_errors(manifest: dict) -> list[str]:
    """The KubeRay operator's own checks (validation.go) that the schema cannot express, for the
    features these manifests use."""
    name, max_len = manifest["metadata"]["name"], {"RayCluster": 53, "RayJob": 47}[manifest["kind"]]
    errors = [] if re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= max_len else [
        f"name {name!r}: a DNS-1035 label of at most {max_len} characters"]
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    if (spec.get("authOptions") or {}).get("mode") == "token" and \
            tuple(int(v) for v in spec["rayVersion"].split(".")[:2]) < (2, 52):
        errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(k in params for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append("resources set in both rayStartParams and the group's resources")
        if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errors.append("autoscaler v2 needs restartPolicy Never or unset")
    return errors


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _load("infra", "k8s", "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load("infra", "k8s", "rayjob.yaml")


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_manifest_is_valid_for_kuberay(name):
    manifest = _load("infra", "k8s", name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert _schema_errors(manifest) == []
    assert _operator_errors(manifest) == []


def test_validation_rejects_broken_manifests(raycluster, rayjob):
    """The validation can fail: a wrong type (the CRD schema) and a misspelt field (strict
    field validation; the bare schema would let the API server drop it silently)."""
    wrong_type = copy.deepcopy(raycluster)
    wrong_type["spec"]["workerGroupSpecs"][1]["replicas"] = "two"
    assert any(e.startswith("spec.workerGroupSpecs.1.replicas:") for e in _schema_errors(wrong_type))

    misspelt = copy.deepcopy(raycluster)
    misspelt["spec"]["workerGroupSpecs"][0]["maxReplica"] = misspelt["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    errors = _schema_errors(misspelt)
    assert any("'maxReplica' was unexpected" in e for e in errors)
    assert any("'maxReplicas' is a required property" in e for e in errors)

    job = copy.deepcopy(rayjob)
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any(e.startswith("spec.shutdownAfterJobFinishes:") for e in _schema_errors(job))

    auth = copy.deepcopy(raycluster)
    auth["spec"]["authOptions"] = {"mode": "on", "token": "x"}
    errors = _schema_errors(auth)
    assert any(e.startswith("spec.authOptions.mode: 'on' is not one of") for e in errors)
    assert any("'token' was unexpected" in e for e in errors)
    old_ray = copy.deepcopy(rayjob)
    old_ray["spec"]["rayClusterSpec"]["rayVersion"] = "2.51.0"
    assert "authOptions.mode token needs rayVersion >= 2.52.0" in _operator_errors(old_ray)


def test_rayjob_runs_the_raycluster(raycluster, rayjob):
    """One cluster definition: the RayJob creates exactly the long-lived RayCluster's cluster."""
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] >= 0
    assert rayjob["spec"]["activeDeadlineSeconds"] > 0 and rayjob["spec"]["backoffLimit"] >= 0
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR\s+(\S+)", _read("infra", "docker", "Dockerfile"), re.M).group(1)
    assert runtime_env["working_dir"] == workdir, "the RayJob ships the image's code folder"


# --- secure by default: token authentication, hardened pods, network policy ---------------------

AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_K8S_TOKEN_AUTH"}


def _pod_templates(manifest: dict) -> dict[str, dict]:
    """{name: pod template} of every pod the manifest makes: head, worker groups, a RayJob's
    submitter."""
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    pods = {"head": spec["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}
    if "submitterPodTemplate" in manifest["spec"]:
        pods["submitter"] = manifest["spec"]["submitterPodTemplate"]
    return pods


def test_every_cluster_manifest_turns_token_authentication_on(raycluster, rayjob):
    """KubeRay's authOptions (the operator then makes the token Secret and sets RAY_AUTH_MODE /
    RAY_AUTH_TOKEN in every container); a container's own RAY_AUTH_* env would override it."""
    for manifest in (raycluster, rayjob):
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        assert spec["authOptions"] == {"mode": "token"}, "the operator-made Secret (named after the cluster)"
        for name, pod in _pod_templates(manifest).items():
            for container in pod["spec"]["containers"]:
                assert not AUTH_ENV & {e["name"] for e in container.get("env", [])}, (name, container["name"])
        assert not AUTH_ENV & {e["name"] for e in spec["autoscalerOptions"].get("env", [])}

    readme = _read("infra", "README.md")
    secret = raycluster["metadata"]["name"]  # utils.CheckName(cluster name), key auth_token
    assert f"kubectl get secret {secret} -o jsonpath='{{.data.auth_token}}' | base64 -d" in readme
    assert "export RAY_AUTH_MODE=token" in readme and "RAY_AUTH_TOKEN=" in readme


def test_cluster_launcher_nodes_require_the_token():
    """`ray up` has no authOptions: each node starts Ray with RAY_AUTH_MODE=token and gets the
    token file at the path Ray reads by default; the job API stays on the head's loopback."""
    config = _load("infra", "aws", "cluster.yaml")
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        env_prefix = command.split("ray start")[0].split(";")[-1].split()
        assert "RAY_AUTH_MODE=token" in env_prefix, command
    home = "/home/ray"  # the image's user ray (infra/docker/Dockerfile)
    assert config["file_mounts"] == {f"{home}/.ray/auth_token": "~/.ray/auth_token"}
    head = shlex.split(next(c for c in starts if "--head" in c).split(";")[-1])
    assert "--dashboard-host=127.0.0.1" in head


def test_pods_run_unprivileged_on_a_read_only_root(raycluster, rayjob):
    """Non-root, no privilege escalation, no capabilities, read-only root file system with /tmp
    (Ray's temp dir) on an emptyDir; only the head (autoscaler) keeps a service account token."""
    for manifest in (raycluster, rayjob):
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        for name, pod in _pod_templates(manifest).items():
            pod_security = pod["spec"]["securityContext"]
            assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0, name
            assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert pod["spec"].get("automountServiceAccountToken", True) is (name == "head"), name
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            containers = [(c["name"], c) for c in pod["spec"]["containers"]]
            if name == "head":  # the operator adds the autoscaler container to the head pod
                containers.append(("autoscaler", spec["autoscalerOptions"]))
            for cname, container in containers:
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False and not security.get("privileged"), cname
                assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add")
                assert security["readOnlyRootFilesystem"] is True, cname
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}/{cname}: /tmp must be writable"


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the check below knows matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admitted(policies: list[dict], pod: dict, port: int, source: dict) -> bool:
    """Kubernetes NetworkPolicy semantics for TCP ingress to `pod` ({labels, ports: {name:
    number}}) in the policies' namespace from `source` ({labels, namespace_labels, same_namespace})."""
    selecting = [p["spec"] for p in policies if _selects(p["spec"]["podSelector"], pod["labels"])
                 and "Ingress" in p["spec"]["policyTypes"]]
    if not selecting:
        return True  # a pod no policy selects is not isolated

    def peer_matches(peer: dict) -> bool:
        if "namespaceSelector" in peer:
            in_namespace = _selects(peer["namespaceSelector"], source["namespace_labels"])
        else:
            in_namespace = source["same_namespace"]
        return in_namespace and _selects(peer.get("podSelector", {}), source["labels"])

    def port_matches(rule_port: dict) -> bool:
        assert rule_port.get("protocol", "TCP") == "TCP"
        value = rule_port["port"]
        return (pod["ports"].get(value) if isinstance(value, str) else value) == port

    return any((not rule.get("from") or any(peer_matches(p) for p in rule["from"]))
               and (not rule.get("ports") or any(port_matches(p) for p in rule["ports"]))
               for spec in selecting for rule in spec.get("ingress", []))


def test_network_policy_admits_only_ray_pods_the_operator_and_clients(raycluster, rayjob):
    with open(os.path.join(INFRA, "k8s", "networkpolicy.yaml")) as f:
        policies = list(yaml.load_all(f, Loader=Loader))
    assert {p["kind"] for p in policies} == {"NetworkPolicy"} and all(
        p["apiVersion"] == "networking.k8s.io/v1" for p in policies)
    pods = _pod_templates(rayjob)
    head_container = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head = {"labels": {**pods["head"]["metadata"]["labels"], "ray.io/node-type": "head"},
            "ports": {p["name"]: p["containerPort"] for p in head_container["ports"]}}
    worker = {"labels": {**pods["gpu"]["metadata"]["labels"], "ray.io/node-type": "worker"}, "ports": {}}
    assert _pod_templates(raycluster)["head"]["metadata"] == pods["head"]["metadata"]
    namespace = {"kubernetes.io/metadata.name": "psa"}
    ray_pod = {"labels": worker["labels"], "namespace_labels": namespace, "same_namespace": True}
    submitter = {"labels": pods["submitter"]["metadata"]["labels"], "namespace_labels": namespace,
                 "same_namespace": True}
    operator = {"labels": {"app.kubernetes.io/name": "kuberay-operator"},
                "namespace_labels": {"kubernetes.io/metadata.name": "ray-system"}, "same_namespace": False}
    stranger = {"labels": {"app": "web"}, "namespace_labels": namespace, "same_namespace": True}
    elsewhere = {**operator, "namespace_labels": {"kubernetes.io/metadata.name": "default"}}
    gcs, job_api, client, agent = 6379, head["ports"]["dashboard"], head["ports"]["client"], 52365
    assert job_api == 8265 and client == 10001 and head["ports"]["gcs-server"] == gcs

    assert all(_admitted(policies, target, port, ray_pod) for target in (head, worker)
               for port in (gcs, job_api, client, agent, 20000)), "Ray pods reach each other on every port"
    assert [_admitted(policies, head, p, submitter)
            for p in (job_api, client, gcs, agent)] == [True, True, False, False]
    assert not _admitted(policies, worker, agent, submitter)
    assert [_admitted(policies, head, p, operator) for p in (job_api, client, gcs)] == [True, False, False]
    for outsider in (stranger, elsewhere):
        assert not any(_admitted(policies, target, port, outsider) for target in (head, worker)
                       for port in (gcs, job_api, client, agent))
    assert _admitted([], head, gcs, stranger), "the check can fail: no policy admits everything"


# --- worker groups versus the pipeline's resource requests -------------------------------------

def _quantity(value: str | int) -> float:
    """A Kubernetes CPU/GPU quantity ("15", "500m", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _limits(group: dict) -> dict[str, float]:
    """Ray resources KubeRay gives a pod of the group: from the Ray container's limits."""
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    requests = container["resources"].get("requests", {})
    assert requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu")) == limits.get("nvidia.com/gpu"), \
        "Kubernetes needs GPU requests equal to limits"
    return {"CPU": _quantity(limits["cpu"]), "GPU": _quantity(limits.get("nvidia.com/gpu", 0))}


def test_worker_groups_host_the_pipeline_actors(raycluster):
    pipeline, spec = PRESETS["paper"].pipeline, raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    groups = _groups(spec)
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1

    gpu = _limits(groups["gpu"])
    assert gpu["GPU"] >= pipeline.gpu_actor_gpus and gpu["CPU"] >= pipeline.gpu_actor_cpus, "a GPU actor fits"
    assert gpu["GPU"] >= 1 and gpu["CPU"] >= 1, "a Ray Train worker (1 GPU, 1 CPU) fits"
    tolerations = groups["gpu"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)

    cpu = _limits(groups["cpu"])
    assert cpu["GPU"] == 0, "CPU-only work must not need GPU nodes"
    assert cpu["CPU"] >= pipeline.crf_actor_cpus + pipeline.decode_cpus, "a CRF actor and a decode task fit"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no tasks or actors on the head"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == int(head["rayStartParams"]["dashboard-port"]) == 8265


def test_every_pod_gets_the_s3_credentials(raycluster):
    spec, secrets = raycluster["spec"], set()
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env)
        assert env["AWS_ENDPOINT_URL"].get("optional") is True
        secrets |= {ref["name"] for ref in env.values()}
    secret = _load("infra", "k8s", "s3-credentials.example.yaml")
    assert secrets == {secret["metadata"]["name"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert all(v.startswith("REPLACE_") for v in secret["stringData"].values()), "placeholders only"


# --- one Ray version and one image everywhere ---------------------------------------------------

def _images(manifest: dict) -> set[str]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}


def test_one_ray_version_and_one_image(raycluster, rayjob):
    base = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu\s*$",
                     _read("infra", "docker", "Dockerfile"), re.M)
    assert base, "the Dockerfile builds on a rayproject/ray GPU image"
    assert base.group(1) == ray.__version__ == raycluster["spec"]["rayVersion"]

    (image,) = _images(raycluster)
    assert _images(rayjob) == {image}
    assert {c["image"] for c in rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"]} == {image}
    assert f"docker build -f infra/docker/Dockerfile -t {image} ." in _read("infra", "README.md")
    assert _load("infra", "aws", "cluster.yaml")["docker"]["image"].endswith("/" + image)


def _dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        pattern = rule.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.removeprefix("**/"))
               for p in prefixes):
            ignored = not rule.startswith("!")
    return ignored


def test_dockerfile_copies_files_in_the_build_context():
    rules = [line.strip() for line in _read(".dockerignore").splitlines()
             if line.strip() and not line.startswith("#")]
    copies = [shlex.split(line)[1:] for line in _read("infra", "docker", "Dockerfile").splitlines()
              if line.startswith("COPY ")]
    sources = [s for args in copies for s in [a for a in args if not a.startswith("--")][:-1]]
    assert {"pyproject.toml", "psa_ray/", "jobs/", ".ci/constraints.txt"} <= set(sources)
    for source in sources:
        path = os.path.join(REPO, source)
        assert os.path.exists(path), source
        files = [os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(path) for f in fs
                 if "__pycache__" not in d] if os.path.isdir(path) else [source]
        assert files and not [f for f in files if _dockerignored(f, rules)], f"{source} is in .dockerignore"
    assert _dockerignored(".venv/bin/python", rules) and _dockerignored("psa_ray/__pycache__/x.pyc", rules)


# --- the Ray cluster launcher config --------------------------------------------------------------

def test_cluster_launcher_config():
    config = _load("infra", "aws", "cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks before any AWS call
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))

    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert set(workers) == {"cpu", "gpu"}
    assert all(t["min_workers"] == 0 for t in workers.values())


# --- every documented command parses with the job's options -------------------------------------

@functools.cache
def _label_job_parser():
    path = os.path.join(REPO, "jobs", "label_dataset.py")
    if os.path.dirname(path) not in sys.path:  # as `python jobs/label_dataset.py` has it (jobs/checkout.py)
        sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location("psa_ray_label_dataset_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def _commands(lines: list[str]) -> Iterator[str]:
    """The command lines that run a job (`python jobs/...`), with `\\` continuations joined."""
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if re.search(r"\bpython jobs/", line):
            yield line.strip()


def _check_job_command(command: str) -> None:
    """The script exists under jobs/ and its argparse accepts the arguments; `ray job submit`
    options are checked by Ray's own CLI parser."""
    tokens = shlex.split(command)
    if tokens[:3] == ["ray", "job", "submit"]:
        params = job_submit_cli.make_context("submit", tokens[3:]).params
        if params["runtime_env_json"]:
            assert isinstance(json.loads(params["runtime_env_json"]), dict)
        tokens = list(params["entrypoint"])
    start = tokens.index("python")
    script, args = tokens[start + 1], tokens[start + 2:]
    assert os.path.isfile(os.path.join(REPO, script)) and script.startswith("jobs/"), command
    assert script == "jobs/label_dataset.py", f"{command}: add a parser for {script} to this test"
    try:
        parsed = _label_job_parser()(args)
    except SystemExit:
        pytest.fail(f"jobs/label_dataset.py rejects the documented arguments: {command}")
    assert parsed.input.startswith("s3://") and parsed.output.startswith("s3://"), \
        f"on a cluster, inputs and outputs must be object storage every node reaches: {command}"


def test_documented_commands_parse(rayjob):
    cluster_section = _read("README.md").split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    code_blocks = re.findall(r"^```[a-z]*\n(.*?)^```", _read("infra", "README.md") + cluster_section, re.M | re.S)
    readme = list(_commands("".join(code_blocks).splitlines()))
    launcher = list(_commands([line.lstrip("# ") for line in _read("infra", "aws", "cluster.yaml").splitlines()
                               if line.startswith("#")]))
    assert any(c.startswith("ray job submit ") for c in readme) and launcher
    for command in [rayjob["spec"]["entrypoint"], *readme, *launcher]:
        _check_job_command(command)


def test_command_check_can_fail():
    with pytest.raises(pytest.fail.Exception):
        _check_job_command("python jobs/label_dataset.py --input s3://b/m.parquet --output s3://b/o --preset huge")
    with pytest.raises(Exception, match="No such option"):
        _check_job_command("ray job submit --adress http://h:8265 -- python jobs/label_dataset.py")
