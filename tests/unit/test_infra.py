"""Checks of the deployment files under infra/ against the project they deploy.

Fast and offline: nothing is built, pulled or submitted. Each manifest is parsed and held to what
the code and pyproject.toml say: job entry points are parsed by the real `sama` argument parser
(and, for the landed jobs, resolved with `--print-config`), images carry the project version,
GPU jobs get GPUs and /dev/shm, secrets only come from the environment. The Kubernetes objects
are validated against vendored schemas (tests/unit/schemas/README.md): the RayJobs against the real
KubeRay CRD with unknown fields rejected, the NetworkPolicies and Secrets against Kubernetes' strict
JSON schemas. The `check_*` helpers raise AssertionError on a problem; the last tests feed them
broken input to prove they do.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import referencing
import yaml

from sama import cli

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
COMPOSE_DIR = INFRA / "compose"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RAYJOB_CRD = SCHEMAS / "ray.io_rayjobs.yaml"
K8S_SCHEMAS = SCHEMAS / "kubernetes-v1.37.0-local-strict"

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

RAYJOB_FILES = ("prep-pretext.yaml", "prep-pairs.yaml", "pretrain.yaml", "sft.yaml")
GPU_RAYJOB_FILES = ("pretrain.yaml", "sft.yaml")
# `python -m jobs.<module>` -> the `sama` subcommand it runs.
JOB_MODULES = {"prep_pretext": "prep-pretext", "prep_pairs": "prep-pairs", "train": "train", "edit": "edit"}
# Jobs whose module must exist now; train and edit land later under exactly these names.
LANDED_JOBS = ("prep_pretext", "prep_pairs")
RECIPES = {"debug", "pretrain", "sft", "pretrain_1.3b", "sft_1.3b"}
FLAGS = {
    "train": {"--recipe", "--set", "--resume"},
    "edit": {"--video", "--instruction", "--model", "--output"},
}
# Options whose value is a storage URI (on a cluster: s3://).
URI_FLAGS = {"--input", "--output", "--manifest", "--video", "--model"}
# One Secret per role (infra/kuberay/secret.example.yaml) and the keys each holds.
STORAGE_SECRET, MLFLOW_SECRET, HF_SECRET = "sama-object-storage", "sama-mlflow", "sama-huggingface"
SECRET_KEYS = {
    STORAGE_SECRET: {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"},
    MLFLOW_SECRET: {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    HF_SECRET: {"HF_TOKEN"},
}
# Containers whose root filesystem stays writable: the training head and GPU workers load weights
# into HF_HOME and write the torch.compile / Triton caches under the home directory.
WRITABLE_ROOT = {
    ("pretrain.yaml", "head"),
    ("pretrain.yaml", "gpu-h100"),
    ("sft.yaml", "head"),
    ("sft.yaml", "gpu-h100"),
}
# The KubeRay operator's pods (Helm chart label); it polls the job through the dashboard.
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
DASHBOARD_PORT = 8265
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "HF_TOKEN",
}
PLACEHOLDER = "REPLACE_ME"


# ---------------------------------------------------------------------------------------------
# helpers


def pin(name: str) -> str:
    """The exact version pyproject.toml pins ``name`` to (core or any extra)."""
    project = PYPROJECT["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs.extend(extra)
    for spec in specs:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", spec.strip())
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no exact version of {name}")


def load_docs(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    assert isinstance(docs[0], dict), f"{path}: not a mapping"
    return docs[0]


def manifest(name: str) -> list[dict]:
    """The objects of a file in infra/kuberay/ (a RayJob file also holds its NetworkPolicy)."""
    docs = load_docs(KUBERAY / name)
    assert all(isinstance(d, dict) for d in docs), f"{name}: a document is not a mapping"
    return docs


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def rayjob(name: str) -> dict:
    jobs = of_kind(manifest(name), "RayJob")
    assert len(jobs) == 1, f"{name}: expected one RayJob, found {len(jobs)}"
    return jobs[0]


def pod_templates(job: dict) -> list[tuple[str, dict]]:
    """(group, pod template) of the head, every worker group and the submitter (if templated)."""
    cluster = job["spec"]["rayClusterSpec"]
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    if job["spec"].get("submitterPodTemplate"):
        out.append(("submitter", job["spec"]["submitterPodTemplate"]))
    return out


def secret_refs(container: dict) -> set[str]:
    """The Secrets a container reads: envFrom secretRefs and env valueFrom secretKeyRefs."""
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    refs |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }
    return refs


def expected_secrets(name: str, group: str) -> set[str]:
    """Least privilege per role: prep pods only reach object storage; the training head (driver,
    preflight, MLflow run) and GPU workers (weights, logging) also MLflow and the Hub; the CPU decode
    workers only storage; the submitter (`ray job submit`) nothing."""
    if group == "submitter":
        return set()
    if name.startswith("prep-") or group == "cpu":
        return {STORAGE_SECRET}
    return {STORAGE_SECRET, MLFLOW_SECRET, HF_SECRET}


# ---------------------------------------------------------------------------------------------
# schemas (tests/unit/schemas/README.md says where each file comes from)


def strict(schema):
    """A copy of an OpenAPI v3 (CRD) schema that rejects unknown fields, as the API server's
    strict field validation does: additionalProperties false on every object schema that lists
    properties, unless it preserves unknown fields or already says what extra keys may hold."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        isinstance(schema.get("properties"), dict)
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in schema
    ):
        out["additionalProperties"] = False
    return out


_CRD_VALIDATOR = None


def rayjob_validator() -> jsonschema.protocols.Validator:
    """Validator of the ray.io/v1 RayJob schema of the vendored KubeRay CRD (strict)."""
    global _CRD_VALIDATOR
    if _CRD_VALIDATOR is None:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with RAYJOB_CRD.open() as f:
            crd = yaml.load(f, Loader=loader)
        assert crd["spec"]["names"]["kind"] == "RayJob" and crd["spec"]["group"] == "ray.io"
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strict(v1["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        _CRD_VALIDATOR = jsonschema.Draft7Validator(schema)
    return _CRD_VALIDATOR


def k8s_validator(filename: str) -> jsonschema.protocols.Validator:
    """Validator of a vendored Kubernetes JSON schema (the -strict variant: unknown fields fail)."""
    resources = []
    for path in sorted(K8S_SCHEMAS.glob("*.json")):
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], referencing.Resource.from_contents(contents)))
    registry = referencing.Registry().with_resources(resources)
    schema = json.loads((K8S_SCHEMAS / filename).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def schema_errors(validator, obj: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def check_schema(validator, obj: dict) -> None:
    errors = schema_errors(validator, obj)
    assert not errors, "\n".join(errors[:20])


def pod_specs(job: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group of a RayJob."""
    cluster = job["spec"]["rayClusterSpec"]
    specs = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    specs += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return specs


def all_containers(job: dict) -> list[dict]:
    out = []
    for _, spec in pod_specs(job):
        out += spec.get("containers", []) + spec.get("initContainers", [])
    submitter = job["spec"].get("submitterPodTemplate")
    if submitter:
        out += submitter["spec"].get("containers", [])
    return out


def images_of(rayjobs: list[dict], cluster: dict) -> set[str]:
    images = {c["image"] for job in rayjobs for c in all_containers(job)}
    for job in rayjobs:
        autoscaler = job["spec"]["rayClusterSpec"].get("autoscalerOptions") or {}
        if "image" in autoscaler:
            images.add(autoscaler["image"])
    docker = cluster.get("docker", {})
    images |= {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    for node_type in cluster["available_node_types"].values():
        if "worker_image" in node_type.get("docker", {}):
            images.add(node_type["docker"]["worker_image"])
    return images


def gpu_count(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def mounts_dev_shm(pod_spec: dict) -> bool:
    """Every container mounts /dev/shm from a memory-backed emptyDir of the pod."""
    memory_volumes = {
        v["name"] for v in pod_spec.get("volumes", []) if (v.get("emptyDir") or {}).get("medium") == "Memory"
    }
    return all(
        any(m["mountPath"] == "/dev/shm" and m["name"] in memory_volumes for m in c.get("volumeMounts", []))
        for c in pod_spec["containers"]
    )


def runtime_env() -> dict:
    return load_one(RUNTIME_ENV)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
    return args


def load_requirements_module():
    spec = importlib.util.spec_from_file_location(
        "sama_infra_requirements", INFRA / "docker" / "requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# checks (raise AssertionError)


def check_entrypoint(entrypoint: str) -> tuple[str, list[str]]:
    """``python -m jobs.<module> ARGS`` with a known module and arguments its parser accepts."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and len(argv) >= 3, f"not `python -m jobs.NAME ...`: {entrypoint!r}"
    assert argv[2].startswith("jobs."), f"not a jobs module: {argv[2]!r}"
    module = argv[2].removeprefix("jobs.")
    assert module in JOB_MODULES, f"jobs.{module} is not one of the job modules {sorted(JOB_MODULES)}"
    if module in LANDED_JOBS:
        assert (ROOT / "jobs" / f"{module}.py").is_file(), f"jobs/{module}.py does not exist"
    args = argv[3:]
    try:
        parsed = cli.build_parser().parse_args([JOB_MODULES[module], *args])
    except SystemExit as exc:
        raise AssertionError(f"`sama {JOB_MODULES[module]}` rejects the arguments {args}") from exc
    if module in FLAGS:
        flags = {a.split("=", 1)[0] for a in args if a.startswith("-")}
        unexpected = flags - FLAGS[module]
        assert not unexpected, f"jobs.{module} takes {sorted(FLAGS[module])}, not {sorted(unexpected)}"
    if module == "train":
        assert parsed.recipe in RECIPES, f"unknown recipe {parsed.recipe!r} (known: {sorted(RECIPES)})"
    return module, args


def storage_uris(args: list[str]) -> list[str]:
    """The storage URIs among a job's arguments: URI-valued options and ``--set *.uri=VALUE``."""
    uris = []
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
        if flag in URI_FLAGS:
            uris.append(value)
        elif flag == "--set":
            key, _, val = value.partition("=")
            if key.endswith("uri"):
                uris.append(val)
    return uris


def check_rayjob(job: dict) -> None:
    """The KubeRay CRD's schema (types, enums, required and unknown fields), then what this project
    relies on beyond it."""
    check_schema(rayjob_validator(), job)
    assert job.get("apiVersion") == "ray.io/v1", job.get("apiVersion")
    assert job.get("kind") == "RayJob", job.get("kind")
    assert job.get("metadata", {}).get("name"), "metadata.name missing"
    spec = job["spec"]
    assert spec["entrypoint"].strip(), "spec.entrypoint missing"
    assert spec.get("submissionMode") == "K8sJobMode"
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("ttlSecondsAfterFinished", -1) >= 0 and spec.get("backoffLimit", -1) >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster.get("rayVersion") == pin("ray"), "rayVersion must equal the ray pin in pyproject.toml"
    workers = cluster["workerGroupSpecs"]
    assert workers, "no workerGroupSpecs"
    names = [g["groupName"] for g in workers]
    assert len(set(names)) == len(names), f"duplicate worker group names {names}"
    for group in workers:
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 0 <= lo <= n <= hi, f"{group['groupName']}: need minReplicas <= replicas <= maxReplicas"
    for name, pod in pod_specs(job):
        assert pod.get("containers"), f"{name}: no containers"
        for container in pod["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                    f"{name}: {kind} need cpu and memory"
                )
            requests, limits = resources["requests"], resources["limits"]
            if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
                assert str(requests.get("nvidia.com/gpu")) == str(limits.get("nvidia.com/gpu")), (
                    f"{name}: GPU requests must equal limits"
                )
    env = yaml.safe_load(spec["runtimeEnvYAML"]) if spec.get("runtimeEnvYAML") else {}
    assert isinstance(env, dict), "runtimeEnvYAML must be a YAML mapping"


def check_secrets_from_environment(job: dict) -> None:
    """Credentials reach containers only through Secrets; RAY_ADDRESS is never pinned."""
    for container in all_containers(job):
        for env in container.get("env", []):
            assert env["name"] != "RAY_ADDRESS", "RAY_ADDRESS must not be hard-coded"
            if env["name"] in SECRET_ENV:
                assert "value" not in env, f"{env['name']} must come from a Secret (valueFrom/envFrom)"
    runtime = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
    env_vars = runtime.get("env_vars", {})
    assert not (set(env_vars) & (SECRET_ENV | {"RAY_ADDRESS"})), "secrets or RAY_ADDRESS in runtimeEnvYAML"
    assert "--address" not in shlex.split(job["spec"]["entrypoint"])


def check_secret_roles(name: str, job: dict) -> None:
    """Each pod reads exactly the Secrets of its role (expected_secrets), by env and by volume."""
    for group, template in pod_templates(job):
        spec = template["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            refs = secret_refs(container)
            assert refs == expected_secrets(name, group), (
                f"{group}/{container['name']}: reads Secrets {sorted(refs)}, "
                f"its role needs {sorted(expected_secrets(name, group))}"
            )
        mounted = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        assert not mounted, f"{group}: mounts Secrets {sorted(mounted)}"


def check_container_security(container: dict, pod_security: dict, where: str, read_only: bool = True) -> None:
    """Non-root, no privilege escalation, no capabilities, and (where it works) a read-only root."""
    sc = container.get("securityContext") or {}
    assert sc, f"{where}: no securityContext"
    assert sc.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
    assert sc.get("runAsUser", pod_security.get("runAsUser", 1000)) != 0, f"{where}: runs as uid 0"
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
    assert sc.get("privileged") is not True, f"{where}: privileged"
    caps = sc.get("capabilities") or {}
    assert "ALL" in caps.get("drop", []) and not caps.get("add"), f"{where}: drop ALL capabilities, add none"
    if read_only:
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"


def check_hardening(name: str, job: dict) -> None:
    """Token auth on; every container (head, workers, submitter, KubeRay's autoscaler sidecar)
    hardened; a writable emptyDir at /tmp for Ray; service-account tokens only where used."""
    cluster = job["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions") or {}
    assert auth.get("mode") == "token", "rayClusterSpec.authOptions.mode must be token"
    assert not auth.get("enableK8sTokenAuth"), "K8s token auth is unsupported for RayJobs"
    assert job["spec"].get("submitterPodTemplate"), "template the submitter pod to harden it"
    for group, template in pod_templates(job):
        spec = template["spec"]
        pod_security = spec.get("securityContext") or {}
        assert pod_security.get("runAsNonRoot") is True, f"{group}: pod runAsNonRoot"
        assert (pod_security.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{group}: seccomp"
        # Only the head needs its token: the autoscaler sidecar talks to the Kubernetes API.
        if group != "head":
            assert spec.get("automountServiceAccountToken") is False, f"{group}: mounts an SA token"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{group}/{container['name']}"
            check_container_security(container, pod_security, where, (name, group) not in WRITABLE_ROOT)
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes.get(tmp[0]["name"], {}), f"{where}: /tmp is not an emptyDir"
    if cluster.get("enableInTreeAutoscaling"):
        options = cluster.get("autoscalerOptions") or {}
        head = cluster["headGroupSpec"]["template"]["spec"]
        check_container_security(options, head.get("securityContext") or {}, "autoscaler")
        head_volumes = {v["name"]: v for v in head.get("volumes", [])}
        tmp = [m for m in options.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in head_volumes.get(tmp[0]["name"], {}), "autoscaler: /tmp emptyDir"


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def check_network_policy(job: dict, policy: dict, other_jobs: list[dict]) -> None:
    """The policy selects every pod of this job's cluster and no other job's, and admits traffic
    to them only from those pods, plus the KubeRay operator on the dashboard port."""
    check_schema(k8s_validator("networkpolicy-networking-v1.json"), policy)
    spec = policy["spec"]
    assert "Ingress" in spec.get("policyTypes", []), "policyTypes must include Ingress"
    selector = spec["podSelector"]
    assert selector.get("matchLabels"), "an empty podSelector selects every pod of the namespace"
    for group, template in pod_templates(job):
        labels = template.get("metadata", {}).get("labels", {})
        assert _selects(selector, labels), f"{group} pods are not selected by {policy['metadata']['name']}"
    for other in other_jobs:
        for group, template in pod_templates(other):
            labels = template.get("metadata", {}).get("labels", {})
            assert not _selects(selector, labels), f"also selects {other['metadata']['name']}/{group}"
    rules = spec.get("ingress", [])
    assert rules, "no ingress rule: the job's own pods could not reach each other"
    own = False
    for rule in rules:
        peers = rule.get("from")
        assert peers, "a rule without `from` admits every source"
        for peer in peers:
            assert "ipBlock" not in peer, "ipBlock peers admit addresses outside the cluster"
            if "namespaceSelector" not in peer:
                assert peer["podSelector"] == selector, f"pods other than the job's own: {peer}"
                own = True
            else:
                assert peer.get("podSelector", {}).get("matchLabels") == OPERATOR_LABELS, (
                    f"cross-namespace peer other than the KubeRay operator: {peer}"
                )
                ports = [p.get("port") for p in rule.get("ports", [])]
                assert ports == [DASHBOARD_PORT], f"the operator needs only the dashboard port: {ports}"
    assert own, "the job's own pods are not admitted"


def check_gpu_job(job: dict) -> None:
    """A GPU group of 8 x nvidia.com/gpu, a CPU group for decoding, and /dev/shm on every pod."""
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(gpu_count(c) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        assert all(gpu_count(c) == 8 for c in group["template"]["spec"]["containers"]), "GPU pods take 8 GPUs"
    assert len(gpu_groups) < len(groups), "no CPU worker group for Ray Data decoding"
    for name, pod in pod_specs(job):
        assert mounts_dev_shm(pod), f"{name}: /dev/shm is not a memory-backed emptyDir"


_SECRET_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AWS access key id"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "Hugging Face token"),
    (re.compile(r"\b(?:ghp|gho|ghs)_[A-Za-z0-9]{30,}\b|\bgithub_pat_\w{30,}"), "GitHub token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "private key"),
    (re.compile(r"://(?!\$)[^\s/:@${]+:(?!\$)[^\s/@${<]+@"), "password in a URI"),
]
# KEY: value / KEY=value where the key names a credential (the word ends the key).
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?<![{$])\b([\w.-]*(?:password|passwd|secret|secret_key|secret_access_key|token|access_key|"
    r"access_key_id|api_key))[\"']?\s*[:=]\s*(.*)$"
)
# Empty, REPLACE_ME, <placeholder>, ${VAR}, a YAML block scalar, or a boolean (automount...Token: false).
_PLACEHOLDER_VALUE = re.compile(r"^(|REPLACE_ME\b.*|<[^>]*>.*|\$\$?\{?[A-Za-z_].*|\|.*|>.*|true|false)$")


def find_literal_secrets(text: str) -> list[str]:
    """Lines of ``text`` that look like a literal credential rather than a placeholder or reference."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for pattern, what in _SECRET_PATTERNS:
            if pattern.search(line):
                found.append(f"line {lineno}: {what}")
        for match in _SECRET_ASSIGNMENT.finditer(line):
            value = match.group(2).split(" #")[0].strip().strip("\"'").strip()
            if not _PLACEHOLDER_VALUE.match(value):
                found.append(f"line {lineno}: {match.group(1)} = {value!r}")
    return found


def check_cluster_config(cfg: dict) -> None:
    """The AWS cluster-launcher layout: head, CPU and 8 x H100 GPU worker types in Docker."""
    assert cfg["provider"]["type"] == "aws" and cfg["provider"].get("region")
    assert cfg["auth"].get("ssh_user")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    by_instance = {t["node_config"]["InstanceType"]: (name, t) for name, t in types.items()}
    assert by_instance["m6i.4xlarge"][0] == cfg["head_node_type"], "the head is an m6i.4xlarge"
    _, cpu = by_instance["c6i.8xlarge"]
    assert 0 <= cpu["min_workers"] <= cpu["max_workers"]
    _, gpu = by_instance["p5.48xlarge"]
    assert gpu["resources"].get("GPU") == 8, "p5.48xlarge nodes advertise 8 GPUs"
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == 8
    gpu_opts = " ".join(gpu.get("docker", {}).get("worker_run_options", []))
    assert "--gpus all" in gpu_opts and "--shm-size" in gpu_opts
    workers = sum(t.get("max_workers", 0) for name, t in types.items() if name != cfg["head_node_type"])
    assert cfg["max_workers"] >= workers, "max_workers below the sum of the node types' max_workers"
    arn = re.compile(r"^arn:aws:iam::(\d{12}|<AWS_ACCOUNT_ID>):instance-profile/[\w+=,.@-]+$")
    for name, t in types.items():
        profile = t["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert arn.match(profile), f"{name}: IamInstanceProfile.Arn {profile!r}"
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_cmds and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    # Ray token auth on every node, the token from a file the launcher copies from outside the repo.
    mounts = {target.removeprefix("~/") for target in cfg.get("file_mounts", {})}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start, f"{key}: no ray start"
        for command in start:
            before = command.split("ray start")[0]
            assert re.search(r"\bRAY_AUTH_MODE=token\b", before), f"{key}: RAY_AUTH_MODE=token not set"
            path = re.search(r"\bRAY_AUTH_TOKEN_PATH=\$HOME/(\S+?);", before)
            assert path and path.group(1) in mounts, f"{key}: RAY_AUTH_TOKEN_PATH is not a file mount"


# ---------------------------------------------------------------------------------------------
# every file


EXPECTED_FILES = [
    "README.md",
    "runtime_env.yaml",
    "docker/Dockerfile",
    "docker/Dockerfile.dockerignore",
    "docker/requirements.py",
    *(f"kuberay/{name}" for name in RAYJOB_FILES),
    "kuberay/secret.example.yaml",
    "aws/cluster.yaml",
    "aws/cluster.env.example",
    "compose/docker-compose.yml",
    "compose/README.md",
    "compose/.env.example",
    "compose/.gitignore",
    "compose/mlflow/Dockerfile",
    "compose/mlflow/basic_auth.ini",
]


@pytest.mark.parametrize("relpath", EXPECTED_FILES)
def test_expected_file_exists(relpath):
    assert (INFRA / relpath).is_file(), f"infra/{relpath} is missing"


YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def test_yaml_files_found():
    assert len(YAML_FILES) >= 8


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path}: empty"
    assert all(isinstance(doc, dict) for doc in docs)


# A local, git-ignored .env (filled-in compose credentials) is the one place secrets may live.
INFRA_TEXT_FILES = sorted(
    p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.name != ".env"
)


@pytest.mark.parametrize("path", INFRA_TEXT_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_no_literal_secrets(path):
    assert not find_literal_secrets(path.read_text()), f"{path}: {find_literal_secrets(path.read_text())}"


# ---------------------------------------------------------------------------------------------
# KubeRay


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_structure(name):
    check_rayjob(rayjob(name))


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_entrypoint_is_a_job_module(name):
    module, args = check_entrypoint(rayjob(name)["spec"]["entrypoint"])
    uris = storage_uris(args)
    assert uris, "the job names no storage"
    assert all(u.startswith("s3://") for u in uris), f"cluster jobs read/write s3:// URIs: {uris}"
    expected = {"prep-pretext.yaml": "prep_pretext", "prep-pairs.yaml": "prep_pairs"}.get(name, "train")
    assert module == expected


@pytest.mark.parametrize("name", [n for n in RAYJOB_FILES if n.startswith("prep-")])
def test_prep_entrypoint_config_resolves(name, capsys):
    """The real CLI resolves the job's configuration (every --set key exists, values type-check)."""
    module, args = check_entrypoint(rayjob(name)["spec"]["entrypoint"])
    assert cli.main([JOB_MODULES[module], *args, "--print-config"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", GPU_RAYJOB_FILES)
def test_train_entrypoint_config_resolves(name):
    """The train job's recipe and --set keys resolve (`--print-config`, no cluster), and the
    recipe's worker count is the GPU group's GPUs."""
    _, args = check_entrypoint(rayjob(name)["spec"]["entrypoint"])
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args, "--print-config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = yaml.safe_load(proc.stdout)
    gpus = 0
    for group in rayjob(name)["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        gpus += int(group.get("replicas", 0)) * int(limits.get("nvidia.com/gpu", 0))
    assert resolved["scaling"]["num_workers"] == gpus and resolved["scaling"]["use_gpu"]


@pytest.mark.parametrize("name", GPU_RAYJOB_FILES)
def test_gpu_jobs_request_gpus_and_shm(name):
    check_gpu_job(rayjob(name))


@pytest.mark.parametrize("name", [n for n in RAYJOB_FILES if n.startswith("prep-")])
def test_prep_jobs_are_cpu_only_with_shm(name):
    job = rayjob(name)
    assert not any(gpu_count(c) for c in all_containers(job)), "prep jobs need no GPUs"
    for group, pod in pod_specs(job):
        assert mounts_dev_shm(pod), f"{group}: /dev/shm for Ray's object store"


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_secrets_come_from_the_secret(name):
    check_secrets_from_environment(rayjob(name))


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_runtime_env_matches_runtime_env_yaml(name):
    runtime = yaml.safe_load(rayjob(name)["spec"]["runtimeEnvYAML"])
    assert runtime["env_vars"] == runtime_env()["env_vars"]
    # The code is baked into the image: nothing to upload or install per job.
    assert not set(runtime) & {"working_dir", "pip", "conda", "uv", "py_modules"}


def test_rayjob_names_are_unique():
    names = [rayjob(n)["metadata"]["name"] for n in RAYJOB_FILES]
    assert len(set(names)) == len(names)


def test_secret_example_is_one_secret_per_role_of_placeholders():
    secrets = manifest("secret.example.yaml")
    validator = k8s_validator("secret-v1.json")
    for secret in secrets:
        check_schema(validator, secret)
        assert secret["kind"] == "Secret"
        assert "data" not in secret, "use stringData: base64 data would hide real values from review"
        assert all(str(v) == PLACEHOLDER for v in secret["stringData"].values()), "every value: REPLACE_ME"
    keys = {s["metadata"]["name"]: set(s["stringData"]) for s in secrets}
    assert keys == SECRET_KEYS, f"Secrets and keys {keys} != {SECRET_KEYS}"


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_matches_the_kuberay_crd(name):
    check_schema(rayjob_validator(), rayjob(name))


def test_crd_schema_rejects_unknown_and_misspelled_fields():
    """Without additionalProperties the CRD schema would accept any typo; strict() makes it fail
    the way `kubectl create --validate=strict` does. Each mutation alone must be caught, at its path."""
    job = rayjob("prep-pairs.yaml")
    validator = rayjob_validator()
    assert not schema_errors(validator, job)
    cluster = ["spec", "rayClusterSpec"]
    head_ctr = [*cluster, "headGroupSpec", "template", "spec", "containers", 0]
    worker = [*cluster, "workerGroupSpecs", 0, "template", "spec"]
    cases = [
        (["spec"], "shutdownAfterJobFinish", "shutdownAfterJobFinishes"),  # misspelled key
        ([*cluster, "authOptions"], "mdoe", "mode"),
        ([*cluster], "authOption", "authOptions"),
        (head_ctr, "securityContex", "securityContext"),
        ([*head_ctr, "securityContext"], "readOnlyRootFileSystem", "readOnlyRootFilesystem"),
        (worker, "automountServiceAccountTokens", "automountServiceAccountToken"),
        ([*cluster, "autoscalerOptions"], "idleTimeoutSecond", "idleTimeoutSeconds"),
    ]
    for path, wrong, right in cases:
        broken = copy.deepcopy(job)
        node = broken
        for key in path:
            node = node[key]
        node[wrong] = node.pop(right)
        errors = schema_errors(validator, broken)
        assert errors and any(wrong in e for e in errors), f"{wrong!r} (for {right!r}) passed: {errors}"
    # Wrong values are caught too (enum, type).
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    assert schema_errors(validator, broken)
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"] = {"num-cpus": 4}
    assert schema_errors(validator, broken)
    # ... and free-form maps stay free-form (labels, resources).
    fine = copy.deepcopy(job)
    fine["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]["any/key"] = "v"
    assert not schema_errors(validator, fine)


def test_strict_keeps_preserve_unknown_fields_open():
    schema = strict(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "free": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    )
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors({"a": {"b": "x"}, "free": {"anything": 1}, "map": {"k": "v"}}))
    assert list(validator.iter_errors({"a": {"c": "x"}}))
    assert list(validator.iter_errors({"z": 1}))
    assert list(validator.iter_errors({"map": {"k": 1}}))


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_has_token_auth_and_hardened_containers(name):
    check_hardening(name, rayjob(name))


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_has_a_network_policy_for_its_cluster(name):
    docs = manifest(name)
    assert {d["kind"] for d in docs} == {"RayJob", "NetworkPolicy"}, [d["kind"] for d in docs]
    (policy,) = of_kind(docs, "NetworkPolicy")
    others = [rayjob(n) for n in RAYJOB_FILES if n != name]
    check_network_policy(rayjob(name), policy, others)


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_pods_read_only_their_roles_secrets(name):
    check_secret_roles(name, rayjob(name))
    defined = {s["metadata"]["name"] for s in manifest("secret.example.yaml")}
    used = {ref for c in all_containers(rayjob(name)) for ref in secret_refs(c)}
    assert used <= defined, f"references Secrets that secret.example.yaml lacks: {sorted(used - defined)}"


@pytest.mark.parametrize("name", [n for n in RAYJOB_FILES if n.startswith("prep-")])
def test_prep_pods_reach_only_object_storage(name):
    for group, template in pod_templates(rayjob(name)):
        for container in template["spec"]["containers"]:
            assert secret_refs(container) <= {STORAGE_SECRET}, f"{group}: {sorted(secret_refs(container))}"


# ---------------------------------------------------------------------------------------------
# images


def test_one_image_tagged_with_the_project_version():
    images = images_of([rayjob(n) for n in RAYJOB_FILES], load_one(CLUSTER_YAML))
    assert len(images) == 1, f"manifests disagree on the image: {sorted(images)}"
    (image,) = images
    repo, _, tag = image.rpartition(":")
    assert repo and "/" in repo, image
    assert tag == VERSION, f"image tag {tag!r} != project version {VERSION!r}"


# ---------------------------------------------------------------------------------------------
# runtime env


def test_runtime_env_yaml():
    env = runtime_env()
    assert set(env) <= {"env_vars", "excludes", "config"}, sorted(env)
    # --working-dir on the command line provides the code; the image provides the dependencies.
    assert "working_dir" not in env and "pip" not in env
    env_vars = env["env_vars"]
    assert env_vars.get("PYTHONUNBUFFERED") == "1"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), "env values: strings"
    assert not set(env_vars) & (SECRET_ENV | {"RAY_ADDRESS", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"})
    excludes = {e.strip("/") for e in env["excludes"]}
    assert {".git", ".venv", "tests"} <= excludes


def test_runtime_env_is_valid_for_ray():
    runtime_env_mod = pytest.importorskip("ray.runtime_env")
    runtime_env_mod.RuntimeEnv(**runtime_env())


def test_working_dir_package_excludes_local_state(tmp_path):
    """Zip the checkout the way `ray job submit --working-dir .` does, with these excludes."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    import zipfile

    target = tmp_path / "pkg.zip"
    packaging._zip_files(str(ROOT), runtime_env()["excludes"], str(target), include_gitignore=True)
    names = zipfile.ZipFile(target).namelist()
    for needed in ("pyproject.toml", "jobs/prep_pretext.py", "jobs/prep_pairs.py", "sama/cli.py"):
        assert needed in names, f"{needed} missing from the working-dir package"
    for prefix in (".git/", ".venv/", "tests/"):
        assert not any(n.startswith(prefix) for n in names), f"{prefix} is uploaded"
    assert target.stat().st_size < 100 * 1024 * 1024, "working-dir package over 100 MiB"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = dockerfile_args(instructions)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 1 and froms[0] == "${BASE_IMAGE}"
    base_repo, _, base_tag = args["BASE_IMAGE"].partition(":")
    assert base_tag and base_tag != "latest", "pin the base image by tag"
    if base_repo == "rayproject/ray":
        assert base_tag.startswith(f"{pin('ray')}-py311-cu"), "base: the pinned Ray, Python 3.11, CUDA"
    # torch: the pyproject pin, installed as `torch==${TORCH_VERSION}` from a CUDA index.
    assert args["TORCH_VERSION"] == pin("torch") == "2.13.0"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and "--index-url" in runs
    assert "/cpu" not in args["TORCH_INDEX_URL"], "the cluster image needs the CUDA build of torch"
    # The project with the extras of a build arg.
    extras = args["SAMA_EXTRAS"]
    assert extras == "all" and extras in PYPROJECT["project"]["optional-dependencies"]
    assert 'requirements.py --extras "${SAMA_EXTRAS}"' in runs
    assert "pip install -r /tmp/requirements.txt" in runs and "pip install --no-deps -e ." in runs
    # Runs as a non-root user.
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"final USER is {users[-1]!r}"


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for path in (".git/HEAD", ".venv/bin/python", "tests/unit/test_infra.py"):
        assert ignored(path), f"{path} is sent to the build"
    for path in (
        "pyproject.toml",
        "README.md",
        "infra/docker/requirements.py",
        "sama/cli.py",
        "jobs/prep_pretext.py",
        "pipelines/common.py",
        "configs/train_debug.toml",
    ):
        assert not ignored(path), f"{path} is needed by the build but ignored"


def test_requirements_helper_resolves_extras():
    module = load_requirements_module()
    everything = module.requirements(PYPROJECT, ["all"])
    assert f"torch=={pin('torch')}" in everything and f"mlflow=={pin('mlflow')}" in everything
    assert set(PYPROJECT["project"]["dependencies"]) <= set(everything)
    assert not any(spec.startswith("sama") for spec in everything), "self-references are expanded"
    prep = module.requirements(PYPROJECT, ["prep"])
    assert not any(spec.startswith("torch") for spec in prep)
    assert any(spec.startswith("ray[") for spec in prep)
    with pytest.raises(SystemExit):
        module.requirements(PYPROJECT, ["no-such-extra"])


# ---------------------------------------------------------------------------------------------
# AWS cluster launcher


def test_cluster_yaml_layout():
    check_cluster_config(load_one(CLUSTER_YAML))


def test_cluster_yaml_matches_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    schema = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load_one(CLUSTER_YAML), schema)


def test_ray_reads_the_token_the_way_cluster_yaml_provides_it(tmp_path):
    """The installed Ray (the pin) takes RAY_AUTH_MODE=token and the token from RAY_AUTH_TOKEN_PATH,
    and without a token refuses to start a node: what the launcher's start commands rely on."""
    pytest.importorskip("ray")
    token = tmp_path / "ray_auth_token"
    token.write_text("0123456789abcdef" * 4)
    probe = (
        "import json, sys\n"
        "from ray._raylet import AuthenticationTokenLoader, AuthenticationMode, get_authentication_mode\n"
        "from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled\n"
        "loader = AuthenticationTokenLoader.instance()\n"
        "has = loader.has_token(ignore_auth_mode=True)\n"
        "token = loader.get_raw_token(ignore_auth_mode=True) if has else None\n"
        "try:\n"
        "    ensure_token_if_auth_enabled(None, create_token_if_missing=False)\n"
        "    ok = True\n"
        "except Exception:\n"
        "    ok = False\n"
        "print(json.dumps([get_authentication_mode() == AuthenticationMode.TOKEN, token, ok]))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on

    def run(env):
        proc = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with_token = run({**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    assert with_token == [True, token.read_text(), True]
    assert run({**base, "RAY_AUTH_MODE": "token"})[::2] == [True, False]


def test_cluster_yaml_installs_nothing_and_keeps_credentials_out_of_the_repo():
    cfg = load_one(CLUSTER_YAML)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert "pip install" not in " ".join(cfg.get(key, [])), f"{key}: the image has the dependencies"
    for local in cfg.get("file_mounts", {}).values():
        path = Path(os.path.expanduser(local)).resolve()
        assert ROOT not in path.parents, f"file_mounts source {local} lies inside the repository"


# ---------------------------------------------------------------------------------------------
# MLflow compose stack


def compose() -> dict:
    return load_one(COMPOSE_DIR / "docker-compose.yml")


def _command_text(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


_CREDENTIAL_KEY = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|ACCESS_KEY_ID|_USER|USERNAME)(_|$)")
_COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


def test_compose_services_and_healthchecks():
    services = compose()["services"]
    for name in ("mlflow", "postgres", "minio"):
        assert name in services, f"service {name} missing"
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert [published_port(p, {})[1:] for p in services["mlflow"]["ports"]] == [("5000", "5000")]
    assert {published_port(p, {})[1] for p in services["minio"]["ports"]} == {"9000", "9001"}
    assert "ports" not in services["postgres"]


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} (enough for the port strings)."""
    return _INTERPOLATION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def published_port(entry, env: dict[str, str]) -> tuple[str, str, str]:
    """(host ip, host port, container port) of a short-syntax ports entry; "" ip = all interfaces."""
    assert isinstance(entry, str), f"use the short syntax HOST_IP:HOST_PORT:CONTAINER_PORT: {entry!r}"
    parts = interpolate(entry, env).split(":")
    if len(parts) == 2:
        return ("", *parts)
    assert len(parts) == 3, entry
    return tuple(parts)


def env_example() -> dict[str, str]:
    out = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def check_compose_ports_local(cfg: dict, env: dict[str, str]) -> None:
    for name, service in cfg["services"].items():
        for entry in service.get("ports", []):
            ip = published_port(entry, env)[0]
            assert ip == "127.0.0.1", f"{name}: {entry!r} publishes on {ip or 'every interface'}"


def test_compose_ports_bind_to_localhost_by_default():
    """Without a .env, and with the example one, every published port is on 127.0.0.1."""
    check_compose_ports_local(compose(), {})
    check_compose_ports_local(compose(), env_example())
    # The check catches the old form and an override to all interfaces.
    with pytest.raises(AssertionError):
        check_compose_ports_local({"services": {"mlflow": {"ports": ["5000:5000"]}}}, {})
    with pytest.raises(AssertionError):
        check_compose_ports_local(compose(), {"BIND_ADDRESS": "0.0.0.0"})


def test_compose_buckets_created_by_a_one_shot_mc():
    services = compose()["services"]
    init = [s for s in services.values() if "minio/mc" in s.get("image", "")]
    assert len(init) == 1, "one mc service creates the buckets"
    script = _command_text(init[0])
    for bucket in ("mlflow", "sama"):
        assert re.search(rf"mc mb [^\n]*local/{bucket}\b", script), f"bucket {bucket} is not created"
    assert init[0]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert init[0].get("restart") == "no"


def test_compose_mlflow_server():
    services = compose()["services"]
    mlflow = services["mlflow"]
    command = _command_text(mlflow).replace("=", " ")
    assert "--artifacts-destination s3://mlflow/" in command
    env = mlflow["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (
        env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
        and "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    )
    conditions = {name: dep["condition"] for name, dep in mlflow["depends_on"].items()}
    assert conditions.get("postgres") == "service_healthy" and conditions.get("minio") == "service_healthy"
    # The version the project pins, in the compose build args and the server Dockerfile.
    assert mlflow["build"]["args"]["MLFLOW_VERSION"] == pin("mlflow") == "3.17.2"
    server_args = dockerfile_args(
        dockerfile_instructions((COMPOSE_DIR / "mlflow" / "Dockerfile").read_text())
    )
    assert server_args["MLFLOW_VERSION"] == pin("mlflow")


def test_compose_volumes_are_declared():
    cfg = compose()
    declared = set(cfg.get("volumes") or {})
    for name in ("postgres", "minio"):
        mounts = cfg["services"][name].get("volumes", [])
        named = {m.split(":")[0] for m in mounts if isinstance(m, str)}
        assert named & declared, f"{name}: data on a named volume"


def test_compose_credentials_come_from_env_file():
    cfg = compose()
    referenced: set[str] = set()
    for name, service in cfg["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for key, value in env.items():
            if _CREDENTIAL_KEY.search(key):
                assert "${" in str(value), f"{name}.{key} must be a ${{VAR}} reference, not a literal"
    text = (COMPOSE_DIR / "docker-compose.yml").read_text()
    referenced = set(_COMPOSE_VAR.findall(text))
    example = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert referenced <= set(example), f".env.example lacks {sorted(referenced - set(example))}"
    for key, value in example.items():
        if re.search(r"(PASSWORD|SECRET|ACCESS_KEY)", key):
            assert value == PLACEHOLDER, f".env.example {key} must be {PLACEHOLDER}"
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()


# ---------------------------------------------------------------------------------------------
# the checks catch broken manifests


@pytest.mark.parametrize(
    "entrypoint",
    [
        "python -m jobs.nonexistent --input s3://a --output s3://b",
        "python -m sama.cli prep-pretext --input s3://a --output s3://b",
        "ray job submit -- python -m jobs.prep_pretext --input s3://a --output s3://b",
        "python -m jobs.prep_pretext --output s3://b",
        "python -m jobs.prep_pairs --input s3://a --output s3://b",
        "python -m jobs.train --recipe pretrain --bogus 1",
        "python -m jobs.train --recipe no-such-recipe",
        "python -m jobs.train --recipe pretrain --config configs/x.toml",
        "python -m jobs.edit --video s3://a.mp4 --model s3://m --output s3://o.mp4",
    ],
)
def test_check_entrypoint_rejects(entrypoint):
    with pytest.raises(AssertionError):
        check_entrypoint(entrypoint)


def test_check_entrypoint_accepts_the_documented_forms():
    check_entrypoint("python -m jobs.prep_pretext --input s3://a/ --output s3://b --set seed=1")
    check_entrypoint(
        "python -m jobs.prep_pairs --manifest s3://a.csv --manifest s3://b.jsonl --output s3://c"
    )
    check_entrypoint("python -m jobs.train --recipe sft_1.3b --set a.b=1 --resume")
    check_entrypoint(
        "python -m jobs.edit --video s3://v.mp4 --instruction 'make it snow' --model /m --output o.mp4"
    )


def test_prep_config_check_rejects_unknown_keys(capsys):
    assert (
        cli.main(
            ["prep-pretext", "--input", "s3://a", "--output", "s3://b", "--set", "nope=1", "--print-config"]
        )
        == 2
    )


def test_broken_rayjobs_fail_the_checks():
    job = rayjob("pretrain.yaml")

    broken = copy.deepcopy(job)
    broken["spec"]["entrypoint"] = "python -m jobs.pretrain --recipe pretrain"
    with pytest.raises(AssertionError):
        check_entrypoint(broken["spec"]["entrypoint"])

    broken = copy.deepcopy(job)
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"]
    with pytest.raises(AssertionError):
        check_gpu_job(broken)

    broken = copy.deepcopy(job)
    for group in broken["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            container["resources"]["limits"].pop("nvidia.com/gpu", None)
            container["resources"]["requests"].pop("nvidia.com/gpu", None)
    with pytest.raises(AssertionError):
        check_gpu_job(broken)

    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = (
        "ghcr.io/sama-project/sama:0.0.1"
    )
    assert len(images_of([broken, rayjob("sft.yaml")], load_one(CLUSTER_YAML))) > 1

    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}
    ]
    with pytest.raises(AssertionError):
        check_secrets_from_environment(broken)

    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["rayVersion"] = "2.9.0"
    with pytest.raises(AssertionError):
        check_rayjob(broken)

    broken = copy.deepcopy(job)
    del broken["spec"]["rayClusterSpec"]["headGroupSpec"]
    with pytest.raises((AssertionError, KeyError)):
        check_rayjob(broken)


def test_broken_hardening_fails_the_checks():
    name = "pretrain.yaml"
    job = rayjob(name)
    check_hardening(name, job)

    def spoil(edit):
        broken = copy.deepcopy(job)
        edit(broken["spec"], broken["spec"]["rayClusterSpec"])
        with pytest.raises(AssertionError):
            check_hardening(name, broken)

    def worker(cluster, i=1):
        return cluster["workerGroupSpecs"][i]["template"]["spec"]

    spoil(lambda spec, cluster: cluster.pop("authOptions"))
    spoil(lambda spec, cluster: cluster["authOptions"].update(mode="disabled"))
    spoil(lambda spec, cluster: spec.pop("submitterPodTemplate"))
    spoil(lambda spec, cluster: worker(cluster)["containers"][0].pop("securityContext"))
    spoil(
        lambda spec, cluster: worker(cluster)["containers"][0]["securityContext"].update(
            readOnlyRootFilesystem=False
        )
    )
    spoil(
        lambda spec, cluster: worker(cluster, 0)["containers"][0]["securityContext"].update(
            allowPrivilegeEscalation=True
        )
    )
    spoil(
        lambda spec, cluster: worker(cluster, 0)["containers"][0]["securityContext"].update(
            capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}
        )
    )
    spoil(lambda spec, cluster: worker(cluster).pop("automountServiceAccountToken"))
    spoil(lambda spec, cluster: worker(cluster)["volumes"].pop())
    spoil(
        lambda spec, cluster: spec["submitterPodTemplate"]["spec"]["securityContext"].update(
            runAsNonRoot=False
        )
    )
    spoil(lambda spec, cluster: cluster["autoscalerOptions"].pop("securityContext"))
    spoil(lambda spec, cluster: cluster["autoscalerOptions"].pop("volumeMounts"))


def test_broken_network_policy_and_secrets_fail_the_checks():
    name = "prep-pairs.yaml"
    job = rayjob(name)
    (policy,) = of_kind(manifest(name), "NetworkPolicy")
    others = [rayjob(n) for n in RAYJOB_FILES if n != name]
    check_network_policy(job, policy, others)

    def spoil(edit, target=None):
        broken_job, broken = copy.deepcopy(job), copy.deepcopy(policy)
        edit(broken_job, broken["spec"])
        with pytest.raises(AssertionError):
            check_network_policy(broken_job, broken, others)

    spoil(lambda j, s: s.update(podSelector={}))
    spoil(lambda j, s: s["podSelector"]["matchLabels"].update({"app.kubernetes.io/instance": "other"}))
    spoil(
        lambda j, s: j["spec"]["submitterPodTemplate"]["metadata"]["labels"].pop("app.kubernetes.io/instance")
    )
    spoil(lambda j, s: s["ingress"].append({}))
    spoil(lambda j, s: s["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}))
    spoil(lambda j, s: s["ingress"].append({"from": [{"namespaceSelector": {}}]}))
    spoil(lambda j, s: s["ingress"][1].pop("ports"))
    spoil(lambda j, s: s.update(policyTypes=["Egress"]))
    spoil(lambda j, s: s.update(podSelecter=s.pop("podSelector")))  # unknown field: schema
    spoil(lambda j, s: s.update(ingress=[]))
    # Another job's pods must not be selected.
    with pytest.raises(AssertionError):
        check_network_policy(job, policy, [job])

    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "envFrom"
    ].append({"secretRef": {"name": MLFLOW_SECRET}})
    with pytest.raises(AssertionError):
        check_secret_roles(name, broken)
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": "HF_TOKEN"}}}
    ]
    with pytest.raises(AssertionError):
        check_secret_roles(name, broken)
    broken = copy.deepcopy(job)
    broken["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["envFrom"] = [
        {"secretRef": {"name": STORAGE_SECRET}}
    ]
    with pytest.raises(AssertionError):
        check_secret_roles(name, broken)
    with pytest.raises(AssertionError):
        check_secret_roles("pretrain.yaml", job)  # the training head needs MLflow and the Hub


def test_broken_cluster_config_fails_the_checks():
    cfg = load_one(CLUSTER_YAML)
    broken = copy.deepcopy(cfg)
    gpu = next(
        t
        for t in broken["available_node_types"].values()
        if t["node_config"]["InstanceType"] == "p5.48xlarge"
    )
    gpu["docker"]["worker_run_options"] = []
    with pytest.raises(AssertionError):
        check_cluster_config(broken)
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Arn"] = "arn:aws:iam::x"
    with pytest.raises(AssertionError):
        check_cluster_config(broken)


@pytest.mark.parametrize(
    "text",
    [
        "AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "MLFLOW_TRACKING_PASSWORD=hunter2",
        'POSTGRES_PASSWORD: "s3cr3t"',
        "HF_TOKEN: hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
        "-----BEGIN RSA PRIVATE KEY-----",
        "MLFLOW_BACKEND_STORE_URI: postgresql://mlflow:pw@postgres:5432/mlflow",
    ],
)
def test_secret_scan_flags_literals(text):
    assert find_literal_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        'AWS_SECRET_ACCESS_KEY: "REPLACE_ME"',
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it in .env}",
        'mc alias set local http://minio:9000 "$${MINIO_ROOT_USER}" "$${MINIO_ROOT_PASSWORD}"',
        "MLFLOW_TRACKING_PASSWORD=<password>",
        'TOKENIZERS_PARALLELISM: "false"',
        "- secretRef:",
        "automountServiceAccountToken: false",
        "HF_TOKEN=",
        "URI: postgresql://${POSTGRES_USER:?set}:${POSTGRES_PASSWORD:?set it}@postgres:5432/mlflow",
    ],
)
def test_secret_scan_accepts_placeholders_and_references(text):
    assert not find_literal_secrets(text)
