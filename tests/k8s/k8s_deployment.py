"""What the tests of the Kubernetes deployment (tests/k8s/test_*.py) share: where k8s/, the Dockerfile and
docs/deploy.md are, the kustomizations and how each renders, and walks over the Ray resources they hold."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kustomize_render

REPO = Path(__file__).resolve().parents[2]  # tests/k8s/ -> the repository root
K8S = REPO / "k8s"
DOCS = REPO / "docs" / "deploy.md"
DOCKERFILE = REPO / "Dockerfile"

KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
# (service kustomization, its sweep kustomization): the RayJob's cluster must equal the RayCluster.
PAIRS = [(k, f"{k}/sweep") for k in KUSTOMIZATIONS if f"{k}/sweep" in KUSTOMIZATIONS]
MOUNT = "/mnt/loftune"  # the shared volume, the same path on every Ray pod
JOBS_DIR = "/etc/loftune/jobs"  # where the head mounts the loftune-jobs ConfigMap


def render(kdir: str) -> list[dict]:
    """The resources of the kustomization k8s/kdir, rendered (a fresh copy: tests may modify it)."""
    return kustomize_render.render(K8S / kdir)


def pins() -> dict[str, str]:
    """`name==version` pins of pyproject.toml's dependencies, plus the project's own version."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {"loftune": project["version"]}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.replace(" ", ""))
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def quantity(value) -> float:
    """A Kubernetes resource quantity ('500m', '4Gi', 2) as a number."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m and m.group(2) in units, f"unparsable quantity {value!r}"
    return float(m.group(1)) * units[m.group(2)]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    """The one resource of a kind in docs (asserted to be exactly one)."""
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, RayCluster spec) of every RayCluster and of every RayJob's own cluster."""
    out = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in by_kind(docs, "RayCluster")]
    out += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in by_kind(docs, "RayJob")]
    return out


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(label, pod spec) of every pod template a Ray resource makes: heads, worker groups, RayJob submitters."""
    out = []
    for label, spec in cluster_specs(docs):
        out.append((f"{label} head", spec["headGroupSpec"]["template"]["spec"]))
        out += [(f"{label} group {g['groupName']}", g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    for d in by_kind(docs, "RayJob"):
        if "submitterPodTemplate" in d["spec"]:
            out.append((f"RayJob/{d['metadata']['name']} submitter", d["spec"]["submitterPodTemplate"]["spec"]))
    return out


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def ray_pods(docs: list[dict]) -> list[tuple[str, dict]]:
    """The pod templates of Ray nodes (heads and worker groups), without RayJob submitters."""
    return [(label, pod) for label, pod in pod_templates(docs) if "submitter" not in label]


def entrypoint(job: dict) -> list[str]:
    """A RayJob's entrypoint as argv, asserted to be `loftune run SPEC ...`."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["loftune", "run"], f"entrypoint {argv}: expected `loftune run SPEC ...`"
    return argv
