"""Storage and jobs of the Kubernetes deployment, checked statically: no cluster, no Ray.

The ReadWriteMany volume mounted at the same path on every Ray pod; the RayJob's cluster equal to the RayCluster
and big enough for its sweep; the RayJob running a spec from the ConfigMap into the volume; the job specs in the
ConfigMap accepted by the real spec loader; autoscaling and the GPU worker groups.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml
from k8s_deployment import (
    JOBS_DIR,
    K8S,
    KUSTOMIZATIONS,
    MOUNT,
    PAIRS,
    cluster_specs,
    entrypoint,
    one,
    quantity,
    ray_pods,
    render,
)


def test_volume_is_read_write_many_in_base_and_gpu():
    for kdir in ("base", "overlays/gpu"):
        pvc = one(render(kdir), "PersistentVolumeClaim")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], kdir
    assert one(render("overlays/gpu"), "PersistentVolumeClaim")["spec"].get("storageClassName")


def _mounts_of(pod: dict, claim: str) -> list[str]:
    names = {v["name"] for v in pod.get("volumes", []) if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    return [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", []) if m["name"] in names]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("service,sweep", PAIRS)
def test_shared_volume_at_the_same_path_on_head_and_workers(service, sweep):
    claim = one(render(service), "PersistentVolumeClaim")["metadata"]["name"]
    for label, pod in ray_pods(render(service) + render(sweep)):
        assert _mounts_of(pod, claim) == [MOUNT], f"{label}: the shared volume must be mounted at {MOUNT}"
        env = _env(pod["containers"][0])
        assert env.get("LOFTUNE_CACHE") == f"{MOUNT}/cache" and env.get("LOFTUNE_RUNS") == f"{MOUNT}/runs", label


def test_shared_volume_check_can_fail():
    cluster = one(render("base"), "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert _mounts_of(worker, "loftune-data") == [MOUNT]
    worker["containers"][0]["volumeMounts"][1]["mountPath"] = "/data"
    assert _mounts_of(worker, "loftune-data") == ["/data"]
    assert _mounts_of(worker, "another-claim") == []


def _sized_out(spec: dict) -> dict:
    """A cluster spec without its worker groups' minReplicas: the one thing a RayJob's cluster, which lives only as
    long as its sweep, may set differently from the long-running RayCluster."""
    spec = copy.deepcopy(spec)
    for group in spec.get("workerGroupSpecs", []):
        group.pop("minReplicas", None)
    return spec


@pytest.mark.parametrize("service,sweep", PAIRS)
def test_rayjob_cluster_equals_the_raycluster(service, sweep):
    cluster, job = one(render(service), "RayCluster"), one(render(sweep), "RayJob")
    assert _sized_out(job["spec"]["rayClusterSpec"]) == _sized_out(cluster["spec"]), (
        f"{sweep}'s RayJob cluster differs from {service}'s RayCluster: change raycluster.yaml and rayjob.yaml (and "
        "the overlays' patches of both) together")


TRIAL_DRIVER_CPUS = 1  # each Tune trial's driver holds one logical CPU (FIELD-NOTES, Ray Train and Ray Tune)


def _min_capacity(spec: dict) -> dict[str, float]:
    """Logical CPUs and GPUs of a cluster at its minimum size (the head has num-cpus 0)."""
    total = {"CPU": 0.0, "GPU": 0.0}
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        total["CPU"] += g["minReplicas"] * quantity(limits["cpu"])
        total["GPU"] += g["minReplicas"] * quantity(limits.get("nvidia.com/gpu", 0))
    return total


@pytest.mark.parametrize("kdir", [s for _, s in PAIRS])
def test_rayjob_cluster_starts_big_enough_for_its_sweep(kdir):
    """`loftune run --address` refuses a cluster that cannot fit one trial as it is when the run starts, and runs
    as many trials at once as fit then: every RayJob's cluster starts with room for one trial, and an overlay's
    (what is deployed) with room for its sweep's `max_concurrent_trials`."""
    job = one(render(kdir), "RayJob")
    name = os.path.basename(entrypoint(job)[2])
    spec = yaml.safe_load((K8S / "base" / "jobs" / name).read_text())
    r = spec["resources"]
    concurrency = (spec["sweep"].get("max_concurrent_trials") or 1) if kdir.startswith("overlays/") else 1
    need = {"CPU": r["workers_per_trial"] * r["cpus_per_worker"] + TRIAL_DRIVER_CPUS,
            "GPU": r["workers_per_trial"] * r.get("gpus_per_worker", 0)}
    have = _min_capacity(job["spec"]["rayClusterSpec"])
    for res, amount in need.items():
        assert have[res] >= amount * concurrency, (
            f"{kdir}: {concurrency} trial(s) of {name} need {amount * concurrency:g} {res}, the cluster starts "
            f"with {have[res]:g}")



@pytest.mark.parametrize("service,sweep", PAIRS)
def test_rayjob_runs_a_spec_from_the_configmap_into_the_volume(service, sweep):
    job = one(render(sweep), "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert 0 <= spec["backoffLimit"] <= 3 and "clusterSelector" not in spec
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and set(runtime_env) <= {"env_vars", "config"}
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())
    argv = entrypoint(job)
    spec_path = argv[2]
    assert os.path.dirname(spec_path) == JOBS_DIR
    jobs = one(render(service), "ConfigMap")
    assert jobs["metadata"]["name"] == "loftune-jobs" and os.path.basename(spec_path) in jobs["data"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    cm_volumes = {v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name") == "loftune-jobs"}
    assert any(m["mountPath"] == JOBS_DIR and m["name"] in cm_volumes for m in head["containers"][0]["volumeMounts"])
    assert argv[argv.index("--address") + 1] == "auto"
    assert argv[argv.index("--out") + 1].startswith(f"{MOUNT}/runs/")


def test_job_specs_validate_with_the_real_loader():
    """Every job spec in the ConfigMap loads with orchestrator.spec; the only problems allowed are data files that
    live on the cluster's volume."""
    from orchestrator.spec import SpecError, load_spec

    configmap = one(render("base"), "ConfigMap")
    assert configmap["data"]
    for name in configmap["data"]:
        path = K8S / "base" / "jobs" / name
        try:
            spec = load_spec(str(path))
        except SpecError as exc:
            others = [p for p in exc.problems if not re.search(rf": no such file {MOUNT}/", p)]
            assert not others, f"{name}: {others}"
            data = yaml.safe_load(path.read_text())
        else:
            data = {"cache": {"uri": spec.cache.uri}, "model": spec.model}
        assert data["cache"]["uri"] == f"{MOUNT}/cache", f"{name}: the cache must be on the shared volume"
        if data["model"].startswith("/"):
            assert data["model"].startswith(f"{MOUNT}/models/"), f"{name}: models live on the shared volume"


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_autoscaling_and_gpu_groups(kdir):
    docs = render(kdir)
    for label, spec in cluster_specs(docs):
        assert spec["enableInTreeAutoscaling"] is True, label
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"], f"{label}: the head is a CPU node"
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{label}: keep work off the head"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1, f"{label} {g['groupName']}"
            pod = g["template"]["spec"]
            gpus = int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            tolerates = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.get(
                "tolerations", [])
            assert (g["groupName"] == "gpu") == (gpus > 0) == tolerates, f"{label} {g['groupName']}"
    groups = {g["groupName"] for _, spec in cluster_specs(docs) for g in spec["workerGroupSpecs"]}
    if "cpu-small" in kdir:
        assert groups == {"cpu"}, f"{kdir}: kind / minikube has no GPUs"
    elif kdir.startswith("overlays/gpu"):
        gpu = [g for _, s in cluster_specs(docs) for g in s["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert gpu and all(g["minReplicas"] >= 1 for g in gpu), f"{kdir}: GPU builds need a GPU at build start"
