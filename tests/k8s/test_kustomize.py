"""The Kubernetes deployment (k8s/) parses and renders, checked statically: no cluster, no Ray, no Docker.

Every YAML file under k8s/ parses; every kustomization renders with tests/kustomize_render.py (the kustomize
subset the overlays use: resources, namespace, configMapGenerator, JSON 6902 patches, images), cross-checked
against `kubectl kustomize` where a kubectl binary exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache

import pytest
import yaml
from k8s_deployment import K8S, KUSTOMIZATIONS, PAIRS, REPO, render
from kustomize_render import RenderError, apply_json6902, load_all, set_images, target_matches


def test_kustomizations_found():
    assert {"base", "base/sweep", "overlays/cpu-small", "overlays/gpu"} <= set(KUSTOMIZATIONS)
    assert {("overlays/gpu", "overlays/gpu/sweep"), ("overlays/cpu-small", "overlays/cpu-small/sweep")} <= set(PAIRS)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in K8S.rglob("*.y*ml")))
def test_every_yaml_file_parses(path):
    docs = load_all(REPO / path)
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: expected mappings, got {type(d).__name__}"
        if "kind" in d and d["kind"] != "Kustomization":
            assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{path}: {d['kind']} lacks a name"


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_kustomization_renders(kdir):
    docs = render(kdir)
    assert docs
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"{kdir}: duplicate resources {names}"
    assert all(d["metadata"].get("namespace") == "loftune" for d in docs), f"{kdir}: not all in namespace loftune"


def test_renderer_refuses_what_it_does_not_implement_and_failed_tests():
    doc = {"kind": "X", "metadata": {"name": "x"}, "spec": {"groups": [{"groupName": "gpu"}]}}
    with pytest.raises(RenderError, match="test failed"):
        apply_json6902(doc, [{"op": "test", "path": "/spec/groups/0/groupName", "value": "cpu"}])
    with pytest.raises(RenderError, match="no such location"):
        apply_json6902(doc, [{"op": "replace", "path": "/spec/groups/3/groupName", "value": "cpu"}])
    patched = apply_json6902(doc, [{"op": "remove", "path": "/spec/groups/0"},
                                   {"op": "add", "path": "/spec/a~1b", "value": 1}])
    assert patched["spec"] == {"groups": [], "a/b": 1} and doc["spec"]["groups"]  # the input is not modified
    with pytest.raises(RenderError, match="outside the supported subset"):
        target_matches(doc, {"kind": "X", "labelSelector": "a=b"})
    node = {"containers": [{"image": "loftune:1-ray2"}, {"image": "other:1"}]}
    set_images(node, [{"name": "loftune", "newName": "reg.example:5000/ml/loftune"}])
    assert node["containers"] == [{"image": "reg.example:5000/ml/loftune:1-ray2"}, {"image": "other:1"}]


def _kubectl_kustomize(kdir: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / kdir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {kdir} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@cache
def _kubectl_kustomize_major() -> int:
    """Major version of the kustomize built into kubectl, 0 when there is no usable kubectl."""
    if shutil.which("kubectl") is None:
        return 0
    out = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True,
                         timeout=60)
    m = re.match(r"v(\d+)", json.loads(out.stdout or "{}").get("kustomizeVersion", "")) if out.returncode == 0 else None
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(kdir):
    if _kubectl_kustomize_major() < 4:  # kubectl < 1.21 embeds kustomize 2, which lacks inline `patches`
        pytest.skip("no kubectl with kustomize >= v4: the pure-Python renderer alone renders the overlays")
    def keyed(docs):
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    ours, theirs = keyed(render(kdir)), keyed(_kubectl_kustomize(kdir))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], f"{kdir}: {key} differs from kubectl kustomize's rendering"
