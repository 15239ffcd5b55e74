"""Several Ray nodes on this machine, driven the way a team drives a real cluster (issue 7, part 1).

One cluster for the whole module, started with the `ray` CLI from the project's venv: a head with no CPUs
(so all work lands on worker nodes) and two worker nodes, each a `ray start --block` in a process group of
its own with a temp dir of its own, so a test can kill one node (raylet, workers and all) without touching
the others. Every node gets the S3 endpoint and credentials in its environment, as KubeRay pods get them
from a Secret; `loftune submit` ships none. The cache and the run directories are folders every node sees
(the same machine: a ReadWriteMany volume in miniature).

Then, through the real CLI and Ray's Job Submission API: a sweep submitted, watched, read back; a job stopped;
the base build spread over both worker nodes; trials on worker nodes only; a worker node killed mid-sweep
(the interrupted trial resumes from its checkpoint on the surviving node); a sweep with its cache on S3.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import psutil
import pytest
import yaml
from conftest import REPO, SWEEP_SPEC, free_port, loftune, trial_reports, write_spec

pytestmark = pytest.mark.slow

VENV_BIN = os.path.dirname(sys.executable)
RAY = os.path.join(VENV_BIN, "ray")
WORKER_NODES = ("node_a", "node_b")
# 3 logical CPUs per worker node (the machine has 2 cores; Ray oversubscribes logically): a trial is a driver
# (1 CPU) + 1 worker (1 CPU), so one node alone still fits both trials' drivers and one worker after the other
# node is lost (see test_killing_a_worker_node_mid_sweep_loses_no_trial and the report on issue 7)
CPUS_PER_NODE = 3
OBJECT_STORE_BYTES = 200 * 1024**2
S3_URI = "s3://loftune-test/multinode"  # the bucket conftest's s3_server makes

# conftest's end-to-end sweep, smaller: two trials (one per worker node) on one base, built by two actors
SPEC = {
    **SWEEP_SPEC,
    "name": "multinode",
    "tasks": [{**SWEEP_SPEC["tasks"][0], "max_train_samples": 128, "max_eval_samples": 32}],
    "training": {**SWEEP_SPEC["training"], "max_steps": 6, "warmup_steps": 1, "eval_every": 6, "checkpoint_every": 3,
                 "report_every": 3},
    "sweep": {"lr": [1e-3, 3e-4], "max_concurrent_trials": 2},
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "build_actors": 2},
}


# ------------------------------------------------------------------------------------------- the cluster


@dataclass
class Node:
    name: str
    temp_dir: str
    proc: subprocess.Popen
    log: str


class LocalCluster:
    """A head and worker nodes on loopback, each `ray start --block` in its own session and temp dir."""

    def __init__(self, root: str, env: dict[str, str]):
        self.root = root
        self.env = env
        self.nodes: dict[str, Node] = {}
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resources: dict | None = None) -> Node:
        temp_dir = os.path.join(self.root, name)  # short: Ray's socket paths live under it (108-byte limit)
        os.makedirs(temp_dir, exist_ok=True)
        log = os.path.join(self.root, f"{name}.log")
        cmd = [RAY, "start", "--block", "--temp-dir", temp_dir, "--disable-usage-stats",
               "--object-store-memory", str(OBJECT_STORE_BYTES),
               "--dashboard-agent-listen-port", str(free_port()), *args]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        with open(log, "wb") as out:
            # cwd: a folder with no `ray/` in it (FIELD-NOTES); own session: the node dies as one process group
            proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = Node(name, temp_dir, proc, log)
        self.nodes[name] = node
        return node

    def start(self) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", "0",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(free_port())])
        self._wait_for(lambda: self._http_ok("/api/version"), 120, "the head's dashboard")
        for name in WORKER_NODES:
            self.start_worker(name)

    def start_worker(self, name: str) -> None:
        self._start(name, ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(CPUS_PER_NODE)],
                    resources={name: 1})
        self._wait_for(lambda: name in self.alive_nodes(), 120, f"worker node {name}")

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.address + path, timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [n for n in self.nodes.values() if n.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{_tail(n.log)}" for n in self.nodes.values())
                raise AssertionError(f"{what} did not come up ({'died' if dead else 'timed out'})\n{logs}")
            time.sleep(0.5)

    def node_table(self) -> list[dict]:
        """Ray's own view of the nodes (state API through the dashboard)."""
        from ray.util.state import list_nodes

        return [vars(n) for n in list_nodes(address=self.address, limit=100, raise_on_missing_output=False)]

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> our node name ('head', 'node_a', ...), for every node that ever joined."""
        out = {}
        for row in self.node_table():
            total = row.get("resources_total") or {}
            names = [n for n in WORKER_NODES if n in total]
            out[row["node_id"]] = names[0] if names else ("head" if row.get("is_head_node") else "?")
        return out

    def alive_nodes(self) -> set[str]:
        try:
            rows = self.node_table()
        except Exception:  # the dashboard is still starting
            return set()
        alive = set()
        for row in rows:
            if row.get("state") == "ALIVE":
                total = row.get("resources_total") or {}
                alive |= {n for n in WORKER_NODES if n in total} | ({"head"} if row.get("is_head_node") else set())
        return alive

    def kill_node(self, name: str) -> None:
        """A node failure: SIGKILL the node's raylet, its workers and every other process of that node."""
        node = self.nodes[name]
        for proc in self._processes(node.temp_dir, node.proc.pid):
            _kill(proc)
        node.proc.wait(timeout=30)

    def _processes(self, marker: str, pgid: int | None = None) -> list[psutil.Process]:
        """Processes of ours: in the node's process group, or naming / working under `marker` (a temp dir)."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid == os.getpid():
                    continue
                args = proc.info["cmdline"] or []
                names_it = any(a == marker or a.endswith("=" + marker) or marker + os.sep in a for a in args)
                if (pgid is not None and os.getpgid(proc.pid) == pgid) or names_it \
                        or (proc.cwd() + os.sep).startswith(marker + os.sep):
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def stop(self) -> None:
        """Kill every process of this cluster: each node's group, then anything still naming our root."""
        for node in self.nodes.values():
            if node.proc.poll() is None:
                with _suppress():
                    os.killpg(node.proc.pid, signal.SIGKILL)
        for proc in self._processes(self.root):
            _kill(proc)
        for node in self.nodes.values():
            with _suppress():
                node.proc.wait(timeout=30)

    def logs(self) -> str:
        """The tail of every node's `ray start` output and of the head's job-server logs (for failures)."""
        parts = [f"--- {n.name}: {n.log}\n{_tail(n.log, 1500)}" for n in self.nodes.values()]
        head = self.nodes.get("head")
        if head:
            session = os.path.join(head.temp_dir, "session_latest", "logs")
            for name in ("dashboard_JobHead.log", "dashboard.log"):
                path = os.path.join(session, name)
                if os.path.exists(path):
                    parts.append(f"--- {path}\n{_tail(path, 1500)}")
        return "\n".join(parts)


def _suppress():
    return contextlib.suppress(OSError, psutil.Error, subprocess.TimeoutExpired)


def _kill(proc: psutil.Process) -> None:
    with _suppress():
        proc.kill()


def _tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError as exc:
        return f"(unreadable: {exc})"


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment for a node or a CLI call: the venv first on PATH, the Makefile's settings,
    and none of the loftune / S3 settings of whoever runs the tests (each call says what it wants)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOFTUNE_", "AWS_", "RAY_ADDRESS")) and k != "VIRTUAL_ENV"}
    env.update(PATH=VENV_BIN + os.pathsep + env.get("PATH", ""), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
               DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.path.join(REPO, ".venv", "torch_extensions"),
               RAY_USAGE_STATS_ENABLED="0", NO_PROXY="127.0.0.1,localhost")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head (0 CPUs, dashboard + Job API on 127.0.0.1) + node_a + node_b (3 CPUs each), torn down always."""
    # not under pytest's tmp dir: Ray's socket paths must stay short; not /tmp itself: it holds a `ray/` folder
    root = tempfile.mkdtemp(prefix="ltmn-", dir="/tmp")
    env = _clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", LOFTUNE_S3_ENDPOINT=s3_server,
                     # notice a dead node within seconds (defaults: 5 missed checks of 3 s)
                     RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    c = LocalCluster(root, env)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ the CLI side


def loftune_json(*args: str) -> dict:
    """`loftune ARGS --json`, parsed. Like every `loftune` call here it runs in _clean_env(): the team's shell,
    with no S3 endpoint or credentials (the nodes have them, as pods do from a Secret)."""
    proc = loftune(*args, "--json", env=_clean_env())
    assert proc.returncode == 0, f"loftune {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def job_client(cluster: LocalCluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address)


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    proc = loftune("logs", job_id, "--address", cluster.address, env=_clean_env())
    return proc.stdout if proc.returncode == 0 else f"(loftune logs failed: {proc.stderr[-1000:]})"


def wait_for_job(cluster: LocalCluster, job_id: str, until: set[str], timeout: float, poll: float = 1.0) -> str:
    """Poll the job's status (Ray's client: cheap; the CLI is checked at chosen moments) until it reaches one of
    `until` or a terminal state; a timeout or another end fails with the job's logs and the cluster's."""
    client, terminal = job_client(cluster), {"SUCCEEDED", "FAILED", "STOPPED"}
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in until or status in terminal:
            break
        time.sleep(poll)
    if status not in until:
        pytest.fail(f"job {job_id}: {status} (wanted {sorted(until)})\n--- job logs\n"
                    f"{job_logs(cluster, job_id)[-6000:]}\n{cluster.logs()}")
    return status


def submit(cluster: LocalCluster, spec: str, *args: str) -> str:
    payload = loftune_json("submit", spec, "--address", cluster.address, *args)
    assert payload["address"] == cluster.address and payload["job_id"]
    return payload["job_id"]


def leaderboard(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "leaderboard.csv")) as f:
        return list(csv.DictReader(f))


def train_runs(cluster: LocalCluster) -> list[dict]:
    """Ray Train v2's record of every Train run (name = trial id) with each attempt's workers and their nodes."""
    with urllib.request.urlopen(cluster.address + "/api/train/v2/runs/v1", timeout=10) as resp:
        return json.load(resp)["train_runs"]


# ------------------------------------------------------------------------------------------------ tests


def test_submit_ships_absolute_paths_and_no_credentials(tmp_path, monkeypatch):
    """What `loftune submit` hands the Job API (a recording client, no cluster): the spec with overrides applied
    and local paths absolute, a run directory outside the job's temporary working directory, storage settings
    (made absolute) but never credentials."""
    from orchestrator import submit as sub

    calls = []

    class Client:
        def submit_job(self, **kw):
            with open(os.path.join(kw["runtime_env"]["working_dir"], sub.SPEC_NAME)) as f:
                calls.append({**kw, "spec": yaml.safe_load(f),
                              "files": sorted(os.listdir(kw["runtime_env"]["working_dir"]))})
            return "job-1"

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\na,b\n")
    spec = dict(SPEC, tasks=[{**SPEC["tasks"][0], "train_file": "data/train.csv"}])
    write_spec(tmp_path / "job.yaml", spec, "cache")
    monkeypatch.chdir(tmp_path)
    for key in ("LOFTUNE_CACHE", "LOFTUNE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOFTUNE_RUNS", "shared/runs")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")

    assert sub.submit(Client(), "job.yaml", "multinode", overrides=["cache.uri=other-cache", "training.lr=0.0003"],
                      out=None) == "job-1"
    (call,) = calls
    assert call["files"] == ["job.yaml", "orchestrator", "workers"]
    assert call["spec"]["cache"]["uri"] == str(tmp_path / "other-cache")  # the override, applied and absolute
    assert call["spec"]["training"]["lr"] == 0.0003 and "--set" not in call["entrypoint"]
    assert call["spec"]["tasks"][0]["train_file"] == str(tmp_path / "data" / "train.csv")
    assert call["runtime_env"]["env_vars"] == {"LOFTUNE_RUNS": str(tmp_path / "shared" / "runs"), "HF_HUB_OFFLINE": "1"}
    assert call["entrypoint"].endswith(f"--out {tmp_path}/shared/runs/multinode")
    assert call["metadata"]["loftune_overrides"] == "--set=cache.uri=other-cache --set=training.lr=0.0003"

    monkeypatch.delenv("LOFTUNE_RUNS")
    sub.submit(Client(), "job.yaml", "multinode", overrides=[], out="runs/here", python="/opt/py/bin/python")
    assert calls[-1]["entrypoint"] == f"/opt/py/bin/python -m orchestrator.cli run job.yaml --address auto " \
                                      f"--out {tmp_path}/runs/here"
    sub.submit(Client(), "job.yaml", "multinode", overrides=[], out=None)  # the cluster's $LOFTUNE_RUNS, else here
    assert calls[-1]["entrypoint"].endswith(f'--out "${{LOFTUNE_RUNS:-{tmp_path}/runs}}"/multinode')
    sub.submit(Client(), "job.yaml", "multinode", overrides=["cache.uri=s3://bucket/prefix"], out="/mnt/runs/x")
    assert calls[-1]["spec"]["cache"]["uri"] == "s3://bucket/prefix"


@pytest.fixture(scope="module")
def dir_sweep(cluster, tmp_path_factory):
    """A 2-trial sweep submitted with `loftune submit` (relative paths, the default --python), its cache and run
    directory in folders all nodes see; `loftune status` asked while it runs and after."""
    root = tmp_path_factory.mktemp("dir-sweep")
    spec = write_spec(root / "job.yaml", SPEC, "cache")  # relative to the submitting shell's directory, like --out
    proc = loftune("submit", "job.yaml", "--address", cluster.address, "--out", "run", "--job-id", "loftune-dir-sweep",
                   "--json", env=_clean_env(), cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = json.loads(proc.stdout)["job_id"]
    wait_for_job(cluster, job_id, {"RUNNING"}, timeout=300)
    running = loftune_json("status", job_id, "--address", cluster.address)
    wait_for_job(cluster, job_id, {"SUCCEEDED"}, timeout=900)
    done = loftune_json("status", job_id, "--address", cluster.address)
    return {"job_id": job_id, "spec": spec, "cache": str(root / "cache"), "run_dir": str(root / "run"),
            "statuses": [running, done]}


def test_submitted_sweep_runs_and_status_logs_results_work(cluster, dir_sweep):
    job_id, run_dir = dir_sweep["job_id"], dir_sweep["run_dir"]
    running, done = dir_sweep["statuses"]
    assert job_id == "loftune-dir-sweep"
    assert (running["status"], done["status"]) == ("RUNNING", "SUCCEEDED"), dir_sweep["statuses"]
    assert done["entrypoint"].endswith(f"orchestrator.cli run job.yaml --address auto --out {run_dir}")
    assert done["entrypoint"].startswith("python ")  # the default --python: the cluster's PATH (the venv's)
    rows = leaderboard(run_dir)  # the relative --out and cache.uri landed beside the spec, not in Ray's temp
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"} and {r["step"] for r in rows} == {"6"}
    assert os.path.isdir(os.path.join(dir_sweep["cache"], "bases"))
    logs = loftune_json("logs", job_id, "--address", cluster.address)["logs"]
    for row in rows:  # the driver's output: the leaderboard and where the run is
        assert row["trial"] in logs
    assert f"run directory: {run_dir}" in logs
    text = loftune("logs", job_id, "--address", cluster.address, env=_clean_env())
    assert text.returncode == 0 and rows[0]["trial"] in text.stdout
    # --follow ends with the job
    follow = loftune("logs", job_id, "--address", cluster.address, "--follow", env=_clean_env(), timeout=120)
    assert follow.returncode == 0 and f"run directory: {run_dir}" in follow.stdout
    assert os.path.isdir(os.path.join(run_dir, "best", "sentiment", "adapter"))


def test_base_build_spread_over_worker_nodes(cluster, dir_sweep):
    from orchestrator.cache import BaseCache

    cache = BaseCache(dir_sweep["cache"])
    (entry,) = cache.ls()
    manifest = cache.show(entry["name"])
    names = cluster.node_ids()
    nodes = {names.get(rec["node"], rec["node"]) for rec in manifest["matrices"].values()}
    assert nodes == set(WORKER_NODES), nodes  # two build actors, one per node (SPREAD); none on the head
    assert "node" not in json.dumps(manifest["key"])  # provenance only, never part of the cache key


def test_trials_ran_on_worker_nodes_only(cluster, dir_sweep):
    """Ray's state API: every Train worker, Tune trial driver and Train controller of the sweep was on a worker
    node (the head has 0 CPUs: true by construction, asserted anyway)."""
    from ray.util.state import list_actors

    names = cluster.node_ids()
    actors = list_actors(address=cluster.address, limit=10000, raise_on_missing_output=False)
    placed: dict[str, set[str]] = {}
    for actor in actors:
        placed.setdefault(actor.class_name, set()).add(names.get(actor.node_id, actor.node_id))
    assert placed.get("RayTrainWorker") and placed["RayTrainWorker"] <= set(WORKER_NODES), placed
    assert placed.get("TrainController") and placed["TrainController"] <= set(WORKER_NODES), placed
    assert placed.get("ImplicitFunc") and placed["ImplicitFunc"] <= set(WORKER_NODES), placed
    assert placed.get("MatrixWorker") == set(WORKER_NODES), placed


def test_stop_a_submitted_job(cluster, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", SPEC, str(tmp_path / "cache"), name="multinode-stopped")
    job_id = submit(cluster, spec, "--out", str(tmp_path / "run"))
    wait_for_job(cluster, job_id, {"RUNNING"}, timeout=300, poll=0.5)
    assert loftune_json("stop", job_id, "--address", cluster.address) == {"job_id": job_id, "stopped": True}
    wait_for_job(cluster, job_id, {"STOPPED"}, timeout=120, poll=0.5)
    assert loftune_json("status", job_id, "--address", cluster.address)["status"] == "STOPPED"
    again = loftune_json("stop", job_id, "--address", cluster.address)
    assert again == {"job_id": job_id, "stopped": False}  # not running any more
    unknown = loftune("status", "no-such-job", "--address", cluster.address, env=_clean_env())
    assert unknown.returncode == 2 and "no job 'no-such-job'" in unknown.stderr


def test_sweep_with_the_cache_on_s3(cluster, s3_server, tmp_path):
    """The nodes hold the S3 endpoint and credentials (as pods get them from a Secret); the submitting shell has
    none and ships none. The job builds its base into s3:// and every trial reads it from there."""
    from orchestrator.cache import BaseCache

    uri = S3_URI
    spec = write_spec(tmp_path / "job.yaml", SPEC, uri, name="multinode-s3",
                      training={**SPEC["training"], "max_steps": 4, "checkpoint_every": 4, "eval_every": 4,
                                "report_every": 2})
    run_dir = str(tmp_path / "run")
    job_id = submit(cluster, spec, "--out", run_dir)
    wait_for_job(cluster, job_id, {"SUCCEEDED"}, timeout=900)
    env_vars = (job_client(cluster).get_job_info(job_id).runtime_env or {}).get("env_vars", {})
    assert not {k for k in env_vars if k.startswith("AWS_") or k == "LOFTUNE_S3_ENDPOINT"}, env_vars
    cache = BaseCache(uri)  # this process has the endpoint and credentials (the s3_server fixture)
    (entry,) = cache.ls()
    assert cache.verify(entry["name"]) == []
    names = cluster.node_ids()
    assert {names.get(r["node"]) for r in cache.show(entry["name"])["matrices"].values()} <= set(WORKER_NODES)
    rows = leaderboard(run_dir)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"} and {r["base"] for r in rows} == {entry["name"]}


# last in the module: it leaves the cluster with one worker node
def test_killing_a_worker_node_mid_sweep_loses_no_trial(cluster, dir_sweep, tmp_path):
    """Two trials (one per node's worth of CPUs), the base already cached. Once every running trial has registered
    a checkpoint and none has finished, one worker node is killed (raylet, workers, all). The sweep finishes:
    a trial that was interrupted continues from its checkpoint on the surviving node, every trial is done."""
    from ray.util.state import list_actors

    max_steps, every = 24, 4
    spec = write_spec(tmp_path / "job.yaml", SPEC, dir_sweep["cache"], name="multinode-failure",
                      training={**SPEC["training"], "max_steps": max_steps, "checkpoint_every": every,
                                "eval_every": 12, "report_every": 2})
    run_dir = str(tmp_path / "run")
    records = os.path.join(run_dir, "trials")
    job_id = submit(cluster, spec, "--out", run_dir)
    names = cluster.node_ids()

    def workers(state: str | None = None) -> dict[str, str]:
        filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", state)] if state else [])
        rows = list_actors(address=cluster.address, filters=filters, limit=10000, raise_on_missing_output=False)
        return {a.actor_id: names.get(a.node_id, a.node_id) for a in rows}

    before = workers()
    victim = None
    deadline = time.monotonic() + 900
    while victim is None and time.monotonic() < deadline:
        status = str(job_client(cluster).get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            pytest.fail(f"the sweep ended ({status}) before a node could be killed\n{job_logs(cluster, job_id)}")
        trials = sorted(os.listdir(records)) if os.path.isdir(records) else []
        checkpointed = [t for t in trials if any("checkpoint" in r for r in trial_reports(run_dir, t))]
        finished = [t for t in trials if max((r.get("step", 0) for r in trial_reports(run_dir, t)), default=0)
                    >= max_steps]
        if len(trials) == 2 and checkpointed == trials and not finished:
            alive = workers("ALIVE")
            nodes = sorted(set(alive.values()) & set(WORKER_NODES))
            if len(alive) == 2 and nodes:
                victim = nodes[0]
                before = workers()
                break
        time.sleep(0.25)
    assert victim, f"never saw both trials checkpointed and running\n{job_logs(cluster, job_id)[-4000:]}"
    cluster.kill_node(victim)
    survivor = next(n for n in WORKER_NODES if n != victim)

    wait_for_job(cluster, job_id, {"SUCCEEDED"}, timeout=900)
    assert victim not in cluster.alive_nodes()
    rows = leaderboard(run_dir)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}, rows
    assert {int(r["step"]) for r in rows} == {max_steps}
    resumed = {r["trial"]: max(x.get("resumed_from", 0) for x in trial_reports(run_dir, r["trial"])) for r in rows}
    assert any(v >= every for v in resumed.values()), resumed  # continued from a checkpoint, not from step 0
    after = {a: n for a, n in workers().items() if a not in before}
    assert after and set(after.values()) == {survivor}, (before, after)  # the restarted workers: the survivor
    print(f"killed {victim}; resumed_from per trial: {resumed}; workers started after: {after}")
