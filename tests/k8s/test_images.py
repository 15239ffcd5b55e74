"""Versions and images of the Kubernetes deployment, checked statically: no cluster, no Docker.

rayVersion, the manifests' image tags, the Dockerfile's base image and pins and the docs' build commands all
match pyproject's pins; the -gpu image goes exactly where GPUs are; .dockerignore keeps the build context small.
"""

from __future__ import annotations

import re

from k8s_deployment import (
    DOCKERFILE,
    DOCS,
    KUSTOMIZATIONS,
    REPO,
    cluster_specs,
    containers,
    pins,
    pod_templates,
    render,
)
from kustomize_render import split_image


def test_rayversion_and_image_tags_match_the_pins():
    p = pins()
    ray, version = p["ray"], p["loftune"]
    for kdir in KUSTOMIZATIONS:
        docs = render(kdir)
        for label, spec in cluster_specs(docs):
            assert spec["rayVersion"] == ray, f"{kdir} {label}: rayVersion {spec['rayVersion']} != pin {ray}"
            assert "image" not in spec.get("autoscalerOptions", {}), f"{label}: the autoscaler runs the head's image"
        for label, pod in pod_templates(docs):
            for c in containers(pod):
                name, tag = split_image(c["image"])
                assert name.rsplit("/", 1)[-1] == "loftune", f"{kdir} {label}: unexpected image {c['image']}"
                assert re.fullmatch(rf"{re.escape(version)}-ray{re.escape(ray)}(-gpu)?", tag or ""), \
                    f"{kdir} {label}: tag {tag!r} is not {version}-ray{ray}[-gpu] (pyproject's version and Ray pin)"


def test_gpu_images_exactly_where_gpus_are():
    """The -gpu image (CUDA torch) on every container that asks for a GPU, and only there."""
    for kdir in KUSTOMIZATIONS:
        for label, pod in pod_templates(render(kdir)):
            for c in containers(pod):
                wants_gpu = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) > 0
                assert c["image"].endswith("-gpu") == wants_gpu, f"{kdir} {label}: {c['image']} (GPU: {wants_gpu})"


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def test_dockerfile_pins_match_pyproject():
    args, p = dockerfile_args(), pins()
    assert args["RAY_VERSION"] == p["ray"], "Dockerfile's Ray differs from pyproject's ray[...] pin"
    assert args["BASE_IMAGE"] == "rayproject/ray:${RAY_VERSION}-py311"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}\s*$", DOCKERFILE.read_text(), re.M)
    assert args["TORCH_VERSION"] == p["torch"] and args["DEEPSPEED_VERSION"] == p["deepspeed"]
    # the base image's Python (py311) must satisfy requires-python
    import tomllib

    from packaging.specifiers import SpecifierSet

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in SpecifierSet(requires), f"rayproject/ray:*-py311 does not satisfy requires-python {requires}"
    text = DOCKERFILE.read_text()
    last_user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    assert last_user.split(":")[0] == "1000", "the image must end as the non-root ray user (uid 1000)"


def _build_commands(text: str) -> list[str]:
    """`docker build ...` commands in text, with backslash continuations (and Dockerfile comment marks) joined."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [m.strip() for m in re.findall(r"docker build [^\n]*", joined)]


def _tags_of(commands: list[str]) -> dict[str, str]:
    """tag -> the command that builds it."""
    out = {}
    for cmd in commands:
        for tag in re.findall(r"-t\s+(\S+)", cmd):
            out[split_image(tag)[1]] = cmd
    return out


def test_docs_and_dockerfile_build_the_tags_the_manifests_use():
    p = pins()
    used = set()
    for kdir in ("base", "base/sweep"):
        for _, pod in pod_templates(render(kdir)):
            used |= {split_image(c["image"])[1] for c in containers(pod)}
    assert used == {f"{p['loftune']}-ray{p['ray']}", f"{p['loftune']}-ray{p['ray']}-gpu"}
    for source in (DOCS, DOCKERFILE):
        built = _tags_of(_build_commands(source.read_text()))
        assert used <= set(built), f"{source.name} builds {sorted(built)}, the manifests use {sorted(used)}"
        for tag, cmd in built.items():
            if tag.endswith("-gpu"):
                assert f"BASE_IMAGE=rayproject/ray:{p['ray']}-py311-gpu" in cmd, f"{source.name}: {cmd}"
            else:
                assert "BASE_IMAGE" not in cmd, f"{source.name}: the CPU image uses the Dockerfile's default base"


def test_dockerignore_keeps_the_context_small():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "*.egg-info", "**/__pycache__"} <= patterns
    assert not any(p.startswith("!") for p in patterns)
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE.read_text(), re.M))
    sources = {s for line in copied for s in line.split()}
    assert sources and not sources & patterns, f"the Dockerfile copies ignored paths: {sources & patterns}"
