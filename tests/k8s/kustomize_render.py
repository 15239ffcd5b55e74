"""A pure-Python renderer of the kustomize subset that k8s/ uses, so the manifests can be checked without kubectl.

The subset: resources (files and directories), namespace, configMapGenerator (name and files, with
generatorOptions.disableNameSuffixHash), inline JSON 6902 patches with a kind / name target, and images. Anything
else is refused with a RenderError: an overlay that starts using another kustomize feature fails here instead of
rendering differently from `kubectl kustomize` (tests/k8s/test_kustomize.py cross-checks the two).
"""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2.3 MB of YAML: libyaml where it exists

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches", "images", "configMapGenerator",
                  "generatorOptions"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                  "PersistentVolume"}


class RenderError(Exception):
    """A kustomization outside the supported subset, or a patch that does not apply."""


def load_all(path: Path) -> list:
    """Every non-empty YAML document of a file."""
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts: list[str]):
    node = doc
    for part in parts:
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            raise KeyError(part)
    return node


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / remove / replace / test, as kustomize applies a `patches:` entry whose patch is a list."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        try:
            parent = _walk(doc, parts[:-1])
            key = parts[-1]
            if op["op"] == "test":
                if _walk(doc, parts) != op["value"]:
                    raise RenderError(f"test failed at {op['path']}: {_walk(doc, parts)!r} != {op['value']!r}")
            elif op["op"] == "remove":
                del parent[int(key) if isinstance(parent, list) else key]
            elif op["op"] == "replace":
                if isinstance(parent, list):
                    parent[int(key)] = copy.deepcopy(op["value"])
                else:
                    if key not in parent:
                        raise RenderError(f"replace of a missing member {op['path']}")
                    parent[key] = copy.deepcopy(op["value"])
            elif op["op"] == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(op["value"]))
                else:
                    parent[key] = copy.deepcopy(op["value"])
            else:
                raise RenderError(f"unsupported JSON patch op {op['op']!r} (supported: add, remove, replace, test)")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise RenderError(f"{op['op']} {op['path']}: no such location ({exc!r})") from None
    return doc


def split_image(image: str) -> tuple[str, str | None]:
    """'registry:5000/name:tag' -> ('registry:5000/name', 'tag'); a digest counts as the tag."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash, colon = image.rfind("/"), image.rfind(":")
    return (image[:colon], image[colon + 1:]) if colon > slash else (image, None)


def set_images(node, images: list[dict]) -> None:
    """kustomize's `images:`: rewrite `image` of every container list item, in any kind (custom resources too)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        name, tag = split_image(container["image"])
                        for entry in images:
                            if entry["name"] == name:
                                new_name = entry.get("newName", name)
                                new_tag = entry.get("newTag", tag)
                                container["image"] = new_name + (f":{new_tag}" if new_tag else "")
            set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            set_images(item, images)


def target_matches(doc: dict, target: dict) -> bool:
    """Whether a patch's `target` (kind and / or name, the supported subset) selects doc."""
    unsupported = set(target) - {"kind", "name"}
    if unsupported:
        raise RenderError(f"patch target keys {sorted(unsupported)} are outside the supported subset (kind, name)")
    return all(doc.get("kind") == target["kind"] if k == "kind" else doc["metadata"]["name"] == target["name"]
               for k in target)


def _generated_configmaps(root: Path, kust: dict) -> list[dict]:
    options = kust.get("generatorOptions", {})
    out = []
    for gen in kust.get("configMapGenerator", []):
        if set(gen) - {"name", "files"} or not options.get("disableNameSuffixHash"):
            raise RenderError(f"{root}: configMapGenerator supported only with name, files and "
                              "generatorOptions.disableNameSuffixHash: true")
        data = {}
        for item in gen["files"]:
            key, _, rel = item.rpartition("=")
            data[key or os.path.basename(rel)] = (root / rel).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return out


def _apply_patches(root: Path, docs: list[dict], patches: list[dict]) -> None:
    for patch in patches:
        if set(patch) - {"target", "patch"}:
            raise RenderError(f"{root}: only inline patches with a target are supported, got {sorted(patch)}")
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise RenderError(f"{root}: only JSON 6902 patches (a list of ops) are supported")
        hits = [i for i, d in enumerate(docs) if target_matches(d, patch["target"])]
        if not hits:
            raise RenderError(f"{root}: patch target {patch['target']} matches no resource")
        for i in hits:
            docs[i] = apply_json6902(docs[i], ops)


@cache
def _render(directory: str) -> tuple:
    root = Path(directory)
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{directory}: kustomization keys {sorted(unknown)} are outside the subset this test "
                          f"renders; keep the overlays to {sorted(SUPPORTED_KEYS)}")
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = (root / entry).resolve()
        docs += [copy.deepcopy(d) for d in _render(str(path))] if path.is_dir() else load_all(path)
    docs += _generated_configmaps(root, kust)
    _apply_patches(root, docs, kust.get("patches", []))
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = kust["namespace"]
    if kust.get("images"):
        for d in docs:
            set_images(d, kust["images"])
    return tuple(docs)


def render(directory: Path) -> list[dict]:
    """The resources the kustomization in directory renders to (a fresh copy each call: tests may modify it)."""
    return copy.deepcopy(list(_render(str(Path(directory).resolve()))))
