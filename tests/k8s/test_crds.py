"""The deployment's RayClusters and RayJobs against KubeRay itself, checked statically: no cluster, no operator.

Every RayCluster and RayJob, as written and as each kustomization renders it, validates against KubeRay's own
CRD schemas (../shared/kuberay-crds, skipped only where that folder is absent), strictly: an unknown field fails,
as it does with kubectl's default server-side field validation. A subset of the operator's own admission rules
too.
"""

from __future__ import annotations

import copy
import re
from functools import cache

import jsonschema
import pytest
from k8s_deployment import K8S, KUSTOMIZATIONS, REPO, by_kind, cluster_specs, one, render
from kustomize_render import load_all

CRDS = REPO.parent / "shared" / "kuberay-crds"


def _strict(schema):
    """An OpenAPI v3 CRD schema as a strict JSON schema: unknown fields are errors (kubectl's default field
    validation), except where the schema preserves them. x-kubernetes-* keywords and formats are ignored."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    crd = load_all(CRDS / f"ray.io_{kind.lower()}s.yaml")[0]
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"], f"ray.io/v1 {kind} is not served by these CRDs"
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1", f"{doc['kind']} {doc['metadata']['name']}: expected ray.io/v1"
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


RAW_RAY_FILES = sorted(p.relative_to(REPO).as_posix() for p in K8S.rglob("*.yaml")
                       if any(d.get("kind") in ("RayCluster", "RayJob") for d in load_all(p)))


@pytest.mark.parametrize("source", RAW_RAY_FILES + [f"rendered:{k}" for k in KUSTOMIZATIONS])
def test_validates_against_kuberay_crd(source):
    docs = render(source.split(":", 1)[1]) if source.startswith("rendered:") else load_all(REPO / source)
    ray_docs = [d for d in docs if d.get("kind") in ("RayCluster", "RayJob")]
    assert ray_docs
    for doc in ray_docs:
        assert schema_errors(doc) == [], f"{source}: {doc['kind']}/{doc['metadata']['name']} does not validate"


def test_crd_validation_catches_typos_and_wrong_types():
    cluster = one(render("base"), "RayCluster")
    assert schema_errors(cluster) == []
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert any("minReplica" in e for e in schema_errors(typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert schema_errors(wrong)
    missing = copy.deepcopy(cluster)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in schema_errors(missing))
    job = one(render("base/sweep"), "RayJob")
    bad_enum = copy.deepcopy(job)
    bad_enum["spec"]["rayClusterSpec"]["autoscalerOptions"]["version"] = "v3"
    assert schema_errors(bad_enum)


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_kuberay_operator_rules(kdir):
    """A subset of the operator's own checks (ray-operator/controllers/ray/utils/validation.go), which run only
    when the resource reaches the operator, after `kubectl apply` has already succeeded."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    docs = render(kdir)
    for d in by_kind(docs, "RayCluster"):
        assert dns1035.fullmatch(d["metadata"]["name"]) and len(d["metadata"]["name"]) <= 53
    for d in by_kind(docs, "RayJob"):
        assert dns1035.fullmatch(d["metadata"]["name"]) and len(d["metadata"]["name"]) <= 47
        spec = d["spec"]
        assert spec.get("ttlSecondsAfterFinished", 0) >= 0 and spec.get("backoffLimit", 0) >= 0
        assert not (spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"))
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    for label, spec in cluster_specs(docs):
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for g in groups:
            start = g.get("rayStartParams", {})
            assert not (g.get("resources") and set(start) & {"num-cpus", "num-gpus", "memory", "resources"}), label
            assert "labels" not in start, label
        assert spec["headGroupSpec"]["template"]["spec"]["containers"], label
        if spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2":
            for g in groups:
                assert g["template"]["spec"].get("restartPolicy", "Never") == "Never", f"{label}: autoscaler v2"
        if spec.get("authOptions", {}).get("mode", "disabled") == "token":
            major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
            assert (major, minor) >= (2, 52), f"{label}: token authentication needs Ray >= 2.52"
