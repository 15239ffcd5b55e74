"""Operations of the Kubernetes deployment, checked statically: no cluster, no Ray, no Docker.

Requests and limits on every container (the autoscaler sidecar too), the security context of every pod and
container, no Service or ingress outside the cluster, no credentials in the manifests, and the S3 credentials of
every Ray pod taken from the optional loftune-s3 Secret.
"""

from __future__ import annotations

import re

import pytest
import yaml
from k8s_deployment import (
    K8S,
    KUSTOMIZATIONS,
    by_kind,
    cluster_specs,
    containers,
    one,
    pod_templates,
    quantity,
    ray_pods,
    render,
)


def _check_resources(label: str, res: dict) -> None:
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{label}: {kind} must set cpu and memory"
    for key, limit in res["limits"].items():
        assert quantity(res["requests"].get(key, limit)) <= quantity(limit), f"{label}: {key} request > limit"
    if "nvidia.com/gpu" in res["limits"] or "nvidia.com/gpu" in res["requests"]:
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), \
            f"{label}: GPU requests must equal limits"


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(kdir):
    docs = render(kdir)
    for label, pod in pod_templates(docs):
        for c in containers(pod):
            _check_resources(f"{kdir} {label} {c['name']}", c.get("resources", {}))
    for label, spec in cluster_specs(docs):
        if spec.get("enableInTreeAutoscaling"):  # the operator injects the autoscaler sidecar from these options
            _check_resources(f"{kdir} {label} autoscaler", spec.get("autoscalerOptions", {}).get("resources", {}))


def _check_container_security(label: str, sc: dict, pod_sc: dict, mounts: list[dict], volumes: dict) -> None:
    assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation must be false"
    assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{label}: capabilities must drop ALL"
    assert not sc.get("capabilities", {}).get("add"), f"{label}: adds capabilities"
    assert not sc.get("privileged"), f"{label}: privileged"
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{label}: runAsNonRoot"
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 1000, f"{label}: runAsUser must be 1000 (ray)"
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault", f"{label}: seccompProfile RuntimeDefault"
    # No container here needs a writable root filesystem: Ray and the libraries write under /tmp.
    assert sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem"
    tmp = [m for m in mounts if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes.get(tmp[0]["name"], {}), f"{label}: read-only root needs an emptyDir at /tmp"
    assert not tmp[0].get("readOnly"), f"{label}: /tmp must be writable"


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_security_contexts(kdir):
    docs = render(kdir)
    for label, pod in pod_templates(docs):
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), label
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert not any("hostPath" in v for v in volumes.values()), f"{label}: hostPath volume"
        pod_sc = pod.get("securityContext", {})
        for c in containers(pod):
            _check_container_security(f"{kdir} {label} {c['name']}", c.get("securityContext", {}), pod_sc,
                                      c.get("volumeMounts", []), volumes)
        if "head" not in label:  # only the head (autoscaler sidecar) talks to the Kubernetes API
            assert pod.get("automountServiceAccountToken") is False, f"{label}: mounts a service account token"
    for label, spec in cluster_specs(docs):
        if spec.get("enableInTreeAutoscaling"):
            head = spec["headGroupSpec"]["template"]["spec"]
            options = spec.get("autoscalerOptions", {})
            _check_container_security(f"{kdir} {label} autoscaler", options.get("securityContext", {}),
                                      head.get("securityContext", {}), options.get("volumeMounts", []),
                                      {v["name"]: v for v in head.get("volumes", [])})


def test_security_check_can_fail():
    cluster = one(render("base"), "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    c = head["containers"][0]
    volumes = {v["name"]: v for v in head["volumes"]}
    _check_container_security("ok", c["securityContext"], head["securityContext"], c["volumeMounts"], volumes)
    for key, value in (("allowPrivilegeEscalation", True), ("readOnlyRootFilesystem", False), ("runAsUser", 0)):
        sc = {**c["securityContext"], key: value}
        with pytest.raises(AssertionError):
            _check_container_security("bad", sc, head["securityContext"], c["volumeMounts"], volumes)
    with pytest.raises(AssertionError, match="emptyDir at /tmp"):
        _check_container_security("bad", c["securityContext"], head["securityContext"],
                                  [m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"], volumes)


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_nothing_is_exposed_outside_the_cluster(kdir):
    docs = render(kdir)
    for d in by_kind(docs, "Service"):
        assert d["spec"].get("type", "ClusterIP") == "ClusterIP", f"{d['metadata']['name']}: {d['spec']['type']}"
    assert not by_kind(docs, "Ingress") and not by_kind(docs, "Route")
    for label, spec in cluster_specs(docs):
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{label}: head service {head['serviceType']}"
        assert not head.get("enableIngress"), f"{label}: enableIngress"
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", label
        assert spec.get("authOptions", {}).get("mode") == "token", f"{label}: the Job API must require a token"


CREDENTIAL_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIALS?)(_|$)", re.I)
CREDENTIAL_TEXT = [re.compile(p) for p in (
    r"\bAKIA[0-9A-Z]{16}\b",  # an AWS access key id
    r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}",  # an AWS secret key
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
)]


def _env_lists(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            else:
                yield from _env_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_lists(item)


def test_no_credentials_in_manifests():
    for path in sorted(K8S.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text()
        for pattern in CREDENTIAL_TEXT:
            assert not pattern.search(text), f"{path}: looks like a credential ({pattern.pattern})"
    for kdir in KUSTOMIZATIONS:
        docs = render(kdir)
        assert not by_kind(docs, "Secret"), f"{kdir}: Secrets are created by hand (docs/deploy.md), never shipped"
        for d in docs:
            for env in _env_lists(d):
                for var in env:
                    if CREDENTIAL_NAME.search(var["name"]):
                        assert "value" not in var, f"{kdir}: {var['name']} has a literal value; use secretKeyRef"
        for d in by_kind(docs, "RayJob"):
            runtime_env = yaml.safe_load(d["spec"].get("runtimeEnvYAML") or "{}")
            for name in runtime_env.get("env_vars", {}):
                assert not CREDENTIAL_NAME.search(name), f"{kdir}: {name} in runtimeEnvYAML (shown by the dashboard)"


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_s3_credentials_come_from_the_secret_on_every_ray_pod(kdir):
    for label, pod in ray_pods(render(kdir)):
        ray_container = pod["containers"][0]
        refs = [e["secretRef"] for e in ray_container.get("envFrom", []) if "secretRef" in e]
        assert {"name": "loftune-s3", "optional": True} in refs, f"{kdir} {label}: no optional loftune-s3 envFrom"
