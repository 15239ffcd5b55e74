"""A run's results read back from real trial records (no Ray): the leaderboard's order and metric direction per
task, the best trial per task, trials in every recorded state, and the files the leaderboard is written to."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from orchestrator.plan import Trial
from orchestrator.results import best_records, format_table, leaderboard, method_of, read_trials, write_leaderboard
from orchestrator.spec import load_spec
from orchestrator.trial_records import append_report, write_status


@pytest.fixture
def spec(tmp_path):
    """Two tasks ranked in opposite directions: accuracy (higher is better) and perplexity (lower is better)."""
    return _spec(tmp_path)


def _spec(tmp_path, overrides: list[str] | None = None):
    (tmp_path / "labels.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "lm.jsonl").write_text('{"text": "1+1=2"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "r", "model": "tiny-bert", "cache": {"uri": str(tmp_path / "cache")},
        "quantization": {"kind": "nf", "bits": 4, "group_size": 64, "method": "loftq", "rank": 4, "iters": 1},
        "tasks": [{"name": "sentiment", "type": "classification", "train_file": str(tmp_path / "labels.csv")},
                  {"name": "lm", "type": "causal_lm", "train_file": str(tmp_path / "lm.jsonl")}],
        "training": {"max_steps": 8}}))
    return load_spec(str(path), overrides)


def _trial(task: str, bits: int = 4, rank: int = 4, lr: float = 1e-3, method: str | None = None) -> Trial:
    name = f"{task}-{'bf16' if bits == 16 else f'nf{bits}'}-r{rank}-lr{lr}"
    return Trial(id=name, task=task, bits=bits, group_size=None if bits == 16 else 64, rank=rank, lr=lr, seed=0,
                 training={}, base=f"base-{bits}", method=method)


def _record(run_dir, trial: Trial, status: str, reports: list[dict], checkpoint_at: int | None = None) -> Trial:
    """Write a trial's record as the sweep's driver does; `checkpoint_at`: the step whose report saved one."""
    write_status(str(run_dir), trial.to_dict(), status)
    for report in reports:
        if report.get("step") == checkpoint_at:
            folder = os.path.join(run_dir, "train", trial.id, "attempt", f"checkpoint_{checkpoint_at}")
            os.makedirs(folder)
            for name in ("trainable.safetensors", "state.json"):
                open(os.path.join(folder, name), "w").close()
            report = {**report, "checkpoint_path": folder}
        append_report(str(run_dir), trial.id, report)
    return trial


def test_each_task_is_ranked_by_its_own_metric_in_its_direction(tmp_path, spec):
    run_dir = tmp_path / "run"
    for lr, accuracy in ((1e-3, 0.6), (2e-3, 0.9), (3e-3, None)):
        _record(run_dir, _trial("sentiment", lr=lr), "done",
                [{"step": 8, "loss": 0.5, **({"eval_accuracy": accuracy} if accuracy is not None else {})}])
    for lr, perplexity in ((1e-3, 5.0), (2e-3, 3.0)):
        _record(run_dir, _trial("lm", lr=lr), "done", [{"step": 8, "eval_perplexity": perplexity}])
    rows = leaderboard(read_trials(str(run_dir), spec), spec)
    sentiment = [r for r in rows if r["task"] == "sentiment"]
    lm = [r for r in rows if r["task"] == "lm"]
    assert [r["value"] for r in sentiment] == [0.9, 0.6, None]  # highest accuracy first, unevaluated last
    assert [r["value"] for r in lm] == [3.0, 5.0]  # lowest perplexity first
    assert [r["place"] for r in sentiment] == [1, 2, 3] and [r["place"] for r in lm] == [1, 2]
    assert {r["metric"] for r in sentiment} == {"eval_accuracy"} and {r["metric"] for r in lm} == {"eval_perplexity"}
    assert [r["task"] for r in rows] == ["sentiment"] * 3 + ["lm"] * 2  # in the spec's task order
    assert {r["type"] for r in lm} == {"causal_lm"}


def test_the_sweep_metric_sets_the_direction_and_ties_go_by_trial_id(tmp_path):
    spec = _spec(tmp_path, ["sweep.metric=loss"])  # a loss: lower is better
    run_dir = tmp_path / "run"
    for lr, loss in ((3e-3, 0.2), (1e-3, 0.4), (2e-3, 0.2)):
        _record(run_dir, _trial("sentiment", lr=lr), "done", [{"step": 8, "loss": loss, "eval_accuracy": 1 - loss}])
    rows = leaderboard(read_trials(str(run_dir), spec), spec)
    assert [(r["value"], r["lr"]) for r in rows] == [(0.2, 2e-3), (0.2, 3e-3), (0.4, 1e-3)]
    assert rows[0]["eval_accuracy"] == 0.8  # the other metrics are columns of their own


def test_a_row_holds_the_latest_value_of_each_metric_and_the_time_of_every_session(tmp_path, spec):
    run_dir = tmp_path / "run"
    trial = _record(run_dir, _trial("sentiment"), "done", [
        {"step": 4, "loss": 0.9, "eval_accuracy": 0.5, "time_total_s": 10.0, "session": "a"},
        {"step": 6, "loss": 0.7, "time_total_s": 20.0, "session": "a"},  # interrupted here, resumed in session b
        {"step": 8, "loss": 0.6, "eval_accuracy": 0.7, "time_total_s": 5.0, "session": "b", "max_steps": 8}])
    (row,) = leaderboard(read_trials(str(run_dir), spec), spec)
    assert (row["trial"], row["value"], row["loss"], row["step"]) == (trial.id, 0.7, 0.6, 8)
    assert row["seconds"] == 25.0  # Tune's clock restarts in each session: 20 + 5


def test_trials_are_read_in_every_state_they_are_recorded_in(tmp_path, spec):
    run_dir = tmp_path / "run"
    done = _record(run_dir, _trial("sentiment", rank=4), "done", [{"step": 8, "eval_accuracy": 0.8}])
    stopped = _record(run_dir, _trial("sentiment", rank=8), "stopped early", [{"step": 4, "eval_accuracy": 0.4}])
    failed = _record(run_dir, _trial("sentiment", rank=16), "failed", [{"step": 2, "loss": 1.0}])
    running = _record(run_dir, _trial("lm"), "running", [{"step": 3, "loss": 2.0, "max_steps": 12}])
    _record(run_dir, _trial("other-task"), "done", [{"step": 8}])  # a task this spec does not have
    foreign = _trial("sentiment", rank=32).to_dict()
    write_status(str(run_dir), {**foreign, "from_another_loftune": 1}, "done")  # Trial fields this loftune lacks
    (run_dir / "trials" / "broken").mkdir()
    (run_dir / "trials" / "broken" / "trial.json").write_text("{not json")
    records = {r.trial.id: r for r in read_trials(str(run_dir), spec)}
    assert set(records) == {done.id, stopped.id, failed.id, running.id}
    assert {i: r.status for i, r in records.items()} == {
        done.id: "done", stopped.id: "stopped early", failed.id: "failed", running.id: "incomplete"}
    assert records[running.id].max_steps == 12 and records[done.id].max_steps == 8  # reported, else the spec's
    assert read_trials(str(tmp_path / "no-run-yet"), spec) == []


def test_the_best_trial_of_each_task_is_the_best_one_with_a_checkpoint(tmp_path, spec):
    run_dir = tmp_path / "run"
    _record(run_dir, _trial("sentiment", lr=1e-3), "done", [{"step": 8, "eval_accuracy": 0.6}], checkpoint_at=8)
    best = _record(run_dir, _trial("sentiment", lr=2e-3), "done",
                   [{"step": 4, "eval_accuracy": 0.7}, {"step": 8, "eval_accuracy": 0.8}], checkpoint_at=4)
    _record(run_dir, _trial("sentiment", lr=3e-3), "done", [{"step": 8, "eval_accuracy": 0.95}])  # no checkpoint
    _record(run_dir, _trial("lm"), "done", [{"step": 8, "loss": 1.0}], checkpoint_at=8)  # no perplexity yet
    chosen = best_records(read_trials(str(run_dir), spec), spec)
    assert set(chosen) == {"sentiment"}  # lm has no trial with its metric
    assert chosen["sentiment"].trial.id == best.id
    assert chosen["sentiment"].checkpoint == str(run_dir / "train" / best.id / "attempt" / "checkpoint_4")


def test_a_checkpoint_outside_the_trials_train_folder_is_not_read_back(tmp_path, spec):
    run_dir = tmp_path / "run"
    trial = _record(run_dir, _trial("sentiment"), "done", [{"step": 8, "eval_accuracy": 0.6}], checkpoint_at=8)
    reports = run_dir / "trials" / trial.id / "reports.jsonl"
    reports.write_text(json.dumps({"step": 8, "eval_accuracy": 0.6, "checkpoint": "../elsewhere"}) + "\n")
    (record,) = read_trials(str(run_dir), spec)
    assert record.checkpoint is None and best_records([record], spec) == {}


def test_the_leaderboard_is_written_as_csv_and_json(tmp_path, spec):
    run_dir = tmp_path / "run"
    _record(run_dir, _trial("sentiment", lr=1e-3), "done", [{"step": 8, "loss": 0.5, "eval_accuracy": 0.6}])
    _record(run_dir, _trial("lm"), "failed", [{"step": 2, "loss": 3.0}])
    rows = leaderboard(read_trials(str(run_dir), spec), spec)
    path = write_leaderboard(str(run_dir), rows)
    assert path == str(run_dir / "leaderboard.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        written = list(reader)
    assert reader.fieldnames == list(dict.fromkeys(k for row in rows for k in row))  # every column any row has
    assert [(r["trial"], r["status"], r["value"]) for r in written] == [
        (rows[0]["trial"], "done", "0.6"), (rows[1]["trial"], "failed", "")]
    assert json.loads((run_dir / "results.json").read_text()) == {"leaderboard": rows}
    write_leaderboard(str(run_dir), rows[:1])  # written again: replaced whole, no temporary file left
    assert len(json.loads((run_dir / "results.json").read_text())["leaderboard"]) == 1
    assert sorted(os.listdir(run_dir)) == ["leaderboard.csv", "results.json", "trials"]


def test_the_text_table_and_the_method_column(tmp_path, spec):
    assert format_table([]) == "(no trials yet)"
    run_dir = tmp_path / "run"
    _record(run_dir, _trial("sentiment", bits=16), "done", [{"step": 8, "eval_accuracy": 0.123456}])
    _record(run_dir, _trial("sentiment", method="qlora"), "done", [{"step": 8}])
    rows = leaderboard(read_trials(str(run_dir), spec), spec)
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["task", "place", "trial", "status", "bits", "group_size", "method", "rank", "lr",
                                "metric", "value", "step", "loss", "seconds", "base"]
    assert lines[1].split()[6] == "lora" and "0.1235" in lines[1]  # the full-precision control trains plain LoRA
    assert lines[2].split()[6] == "qlora" and lines[2].split()[10] == "-"  # not evaluated yet
    assert method_of(_trial("sentiment"), spec) == "loftq"  # an older record without a method: the spec's


def test_importing_results_loads_no_ray_and_changes_no_process_setting():
    code = """
import logging, os, sys
env, levels = dict(os.environ), {n: logging.getLogger(n).level for n in ("", "ray", "ray.tune", "ray.train")}
handlers = list(logging.getLogger().handlers)
import orchestrator.results
import orchestrator.run_dir
assert "ray.tune" not in sys.modules and "ray" not in sys.modules, "ray imported"
assert dict(os.environ) == env, {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}
assert {n: logging.getLogger(n).level for n in levels} == levels, "logger levels changed"
assert logging.getLogger().handlers == handlers, "root handlers changed"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_run_directory_layout_loads_none_of_ray_torch_or_tqdm():
    code = "import sys, orchestrator.run_dir, orchestrator.trial_records\n" \
           "print(sorted(m for m in ('ray', 'torch', 'tqdm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
