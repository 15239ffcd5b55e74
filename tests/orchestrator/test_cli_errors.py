"""Every malformed spec through the real command: exit code 2, a message naming the field, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_spec import CORPUS, VALID, mutate

from orchestrator.cli import EXIT_INVALID, main

# Problems only the planner (model shapes), the data check (files, columns) or the cluster can see.
LATE_CORPUS = [
    ("sweep.group_size", [64, 7], "sweep.group_size[1]: encoder.layer.0"),
    ("quantization.group_size", 100, "quantization.group_size: encoder.layer.0"),
    ("sweep.rank", [8, 512], "sweep.rank[1]: rank 512 exceeds"),
    ("resources.workers_per_trial", 512, "resources.workers_per_trial: 512 workers"),
    ("resources.gpus_per_worker", 1, "resources.gpus_per_worker: 1 workers x 1 GPUs"),
    ("model", "/no/such/model", "model: '/no/such/model' is neither a directory"),
    ("quantization.targets", ["nothing_matches"], "quantization.targets: ['nothing_matches'] match no"),
    ("sweep.bits", [], "sweep.bits: an empty list sweeps nothing"),
    ("sweep", {"mode": "random"}, "sweep: mode 'random' needs at least one axis"),
    ("sweep.training", {"lr": [1e-4]}, "sweep.training.lr: not a sweepable training field"),
    ("sweep.training", {"zero_stage": [2, 4]}, "sweep.training.zero_stage[1]: expected one of [0, 1, 2, 3]"),
    ("sweep.training", {"warmup_steps": 5}, "sweep.training.warmup_steps: expected a non-empty list"),
    ("sweep.lr_range", [1e-5, 1e-3], "sweep.lr_range: only for mode 'random'"),
    ("sweep.metric", "eval_bleu", "sweep.metric: 'eval_bleu' is not reported by tasks[0]"),
    ("sweep.reduction_factor", 1, "sweep.reduction_factor: expected an integer >= 2"),
    ("name", "my run!", "name: expected letters, digits"),
    ("adapter", {"init": "loftq"}, None),  # fine with method loftq: checked below with qlora
]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def assert_invalid(code: int, out: str, err: str, needle: str) -> None:
    assert code == EXIT_INVALID, err
    assert needle in err, err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("path,value,needle", CORPUS, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CORPUS])
def test_spec_corpus_exits_2_naming_the_field(tmp_path, capsys, path, value, needle):
    assert_invalid(*run_cli(["validate", write(tmp_path, mutate(path, value))], capsys), needle)


LATE = [c for c in LATE_CORPUS if c[2]]


@pytest.mark.parametrize("path,value,needle", LATE, ids=[f"{c[0]}={c[1]!r}"[:40] for c in LATE])
def test_problems_found_by_planning_exit_2(tmp_path, capsys, path, value, needle):
    """`validate` and `run --dry-run` prepare a run the same way (orchestrator.run.prepare): same problems."""
    spec = write(tmp_path, mutate(path, value))
    assert_invalid(*run_cli(["validate", spec], capsys), needle)
    assert_invalid(*run_cli(["run", spec, "--dry-run", "--out", str(tmp_path / "run")], capsys), needle)
    assert not os.path.exists(tmp_path / "run")  # nothing is written before the spec is good


def test_loftq_init_without_factors_is_refused(tmp_path, capsys):
    data = mutate("quantization.method", "qlora")
    data["adapter"] = {"init": "loftq"}
    assert_invalid(*run_cli(["validate", write(tmp_path, data)], capsys), "adapter.init: 'loftq' starts from")


def test_duplicate_task_names(tmp_path, capsys):
    data = mutate("tasks", VALID["tasks"] * 2)
    assert_invalid(*run_cli(["validate", write(tmp_path, data)], capsys), "tasks: the name 's' is used twice")


def test_a_missing_column_is_named_before_any_work(tmp_path, capsys):
    csv = tmp_path / "data.csv"
    csv.write_text("text,sentiment\n" + "".join(f"tweet {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    data = mutate("tasks.0.train_file", str(csv))
    assert_invalid(*run_cli(["run", write(tmp_path, data), "--out", str(tmp_path / "run")], capsys),
                   f"tasks[0].label_column: no column 'label' in train_file {csv}")
    assert not os.path.exists(tmp_path / "run")  # nothing was started, nothing half-written


@pytest.mark.parametrize("text,needle", [
    ("name: t\nmodel: [unclosed\n", "YAML syntax error at line 3"),
    ("name: t\n  model: x\n bad", "YAML syntax error at line"),
    ("- a\n- list\n", "expected a mapping"),
])
def test_yaml_errors_exit_2_with_the_line(tmp_path, capsys, text, needle):
    assert_invalid(*run_cli(["run", write(tmp_path, text), "--dry-run"], capsys), needle)


def test_missing_spec_file_and_bad_override(tmp_path, capsys):
    assert_invalid(*run_cli(["validate", str(tmp_path / "nope.yaml")], capsys), "nope.yaml")
    assert_invalid(*run_cli(["validate", write(tmp_path, VALID), "--set", "training.lr"], capsys),
                   "--set 'training.lr': expected KEY=VALUE")
    assert_invalid(*run_cli(["validate", write(tmp_path, VALID), "--set", "training.zero_stage=4"], capsys),
                   "training.zero_stage: expected one of [0, 1, 2, 3]")


def test_every_problem_at_once_with_its_path(tmp_path, capsys):
    data = mutate("training.zero_stage", 4)
    data["sweep"]["bits"] = [2, 8]
    data["colour"] = "red"
    code, _, err = run_cli(["validate", write(tmp_path, data)], capsys)
    assert code == EXIT_INVALID and "3 problem(s)" in err
    assert "sweep.bits[1]" in err and "training.zero_stage" in err and "colour: unknown key" in err


def test_results_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert_invalid(*run_cli(["results", str(tmp_path)], capsys), "is not a loftune run directory")


@pytest.mark.parametrize("data,needle", [
    ("name: t\nmodel: [unclosed\n", "YAML syntax error at line 3"),
    (mutate("colour", "red"), "colour: unknown key"),
    (mutate("resources.workers_per_trial", 512), "resources.workers_per_trial"),
])
def test_the_installed_command_exits_2_without_traceback(tmp_path, data, needle):
    loftune = os.path.join(os.path.dirname(sys.executable), "loftune")
    proc = subprocess.run([loftune, "validate", write(tmp_path, data)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_results_of_a_run_whose_spec_or_records_are_corrupt(tmp_path, capsys):
    """A corrupt spec.yaml is exit 2 naming the file; a corrupt trial record is skipped with a warning naming it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_bytes(b"name: x\nmodel: \xff\xfe\n")
    assert_invalid(*run_cli(["results", str(run_dir)], capsys), "spec.yaml: 1 problem(s)\n  not UTF-8")
    (run_dir / "spec.yaml").write_text("{" * 2000)
    assert_invalid(*run_cli(["results", str(run_dir)], capsys), "spec.yaml")
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(VALID))
    (run_dir / "trials" / "t1").mkdir(parents=True)
    (run_dir / "trials" / "t1" / "trial.json").write_text('{"trial": {"id": "t1"}, "stat')
    (run_dir / "trials" / "t1" / "reports.jsonl").write_text("\x00\x01 not json\n")
    code, out, err = run_cli(["results", str(run_dir), "--json"], capsys)
    assert code == 0 and "ignoring the unreadable trial record" in err and "t1" in err and "Traceback" not in err
    assert json.loads(out)["leaderboard"] == []
