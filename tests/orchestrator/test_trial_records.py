"""loftune's own trial records, the path rules under them and the run directory that holds them (no Ray): what a
resume and a report read back, and which directory a run may claim."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from orchestrator.errors import SpecError
from orchestrator.run_dir import check_run_dir, claim_run_dir, read_run_spec
from orchestrator.safe_paths import check_component, is_inside, remove_tree
from orchestrator.spec import load_spec
from orchestrator.trial_records import (
    append_report,
    latest_checkpoint,
    migrate_tune_layout,
    read_states,
    write_status,
)

TRIAL = {"id": "t-nf4-g64-r4-lr0.001", "task": "t", "bits": 4, "group_size": 64, "rank": 4, "lr": 0.001,
         "seed": 0, "training": {}, "base": "b"}


def _checkpoint(run_dir, trial_id: str, name: str) -> str:
    path = os.path.join(run_dir, "train", trial_id, "attempt", name)
    os.makedirs(path)
    for file in ("trainable.safetensors", "state.json"):
        open(os.path.join(path, file), "w").close()
    return path


@pytest.mark.parametrize("name", ["/etc", "../../victimT", "..", ".hidden", "a/b", "", "x" * 201, None, "a\0b"])
def test_names_that_are_not_one_plain_component_are_refused(name):
    with pytest.raises(ValueError, match="not a plain name"):
        check_component(name, "tasks[0].name")


def test_remove_tree_stays_inside_its_root(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "outside"
    (root / "best" / "t").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    os.symlink(outside, root / "best" / "link")
    remove_tree(str(root / "best" / "link"), str(root))  # the link goes, never what it points at
    assert not os.path.lexists(root / "best" / "link") and (outside / "keep.txt").exists()
    os.symlink(outside, root / "linked-dir")
    with pytest.raises(ValueError, match="not inside"):
        remove_tree(str(root / "linked-dir" / "keep.txt"), str(root))
    with pytest.raises(ValueError, match="not inside"):
        remove_tree(str(outside), str(root))
    assert (outside / "keep.txt").exists()
    remove_tree(str(root / "best" / "t"), str(root))
    assert not (root / "best" / "t").exists()
    assert is_inside(str(root / "best"), str(root)) and not is_inside(str(root), str(root))


def test_reports_record_checkpoints_relative_to_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = _checkpoint(run_dir, TRIAL["id"], "checkpoint_1")
    write_status(str(run_dir), TRIAL, "running")
    append_report(str(run_dir), TRIAL["id"], {"step": 2, "loss": 1.5, "nested": {"not": "kept"}})
    append_report(str(run_dir), TRIAL["id"], {"step": 4, "checkpoint_path": ckpt})
    with open(run_dir / "trials" / TRIAL["id"] / "reports.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert lines[0] == {"step": 2, "loss": 1.5} and lines[1]["checkpoint"] == os.path.join(
        "train", TRIAL["id"], "attempt", "checkpoint_1")
    moved = tmp_path / "moved"
    os.rename(run_dir, moved)  # a run directory copied or mounted elsewhere still finds its checkpoints
    assert latest_checkpoint(str(moved), TRIAL["id"]) == os.path.join(moved, lines[1]["checkpoint"])
    [state] = read_states(str(moved))
    assert state.status == "running" and state.trial == TRIAL and len(state.reports) == 2


def test_a_checkpoint_outside_the_trials_train_folder_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    other = _checkpoint(run_dir, "other-trial", "checkpoint_1")
    with pytest.raises(ValueError, match="not in the run directory"):
        append_report(run_dir, TRIAL["id"], {"step": 4, "checkpoint_path": other})
    write_status(run_dir, TRIAL, "running")
    path = os.path.join(run_dir, "trials", TRIAL["id"], "reports.jsonl")
    with open(path, "w") as f:  # a hand-edited record
        for rel in (os.path.relpath(other, run_dir), "../../../etc", "/etc"):
            f.write(json.dumps({"step": 4, "checkpoint": rel}) + "\n")
        f.write('{"step": 6, "cut sho')  # a line cut short by a crash
    assert latest_checkpoint(run_dir, TRIAL["id"]) is None
    assert [r["step"] for r in read_states(run_dir)[0].reports] == [4, 4, 4]


def test_unreadable_records_are_skipped_with_a_warning(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    write_status(run_dir, TRIAL, "done")
    bad = os.path.join(run_dir, "trials", "forged")
    os.makedirs(bad)
    with open(os.path.join(bad, "trial.json"), "w") as f:
        json.dump({"trial": {**TRIAL, "id": "../../elsewhere"}, "status": "done"}, f)
    os.makedirs(os.path.join(run_dir, "trials", "broken"))
    with open(os.path.join(run_dir, "trials", "broken", "trial.json"), "w") as f:
        f.write("{not json")
    assert [s.trial["id"] for s in read_states(run_dir)] == [TRIAL["id"]]
    err = capsys.readouterr().err
    assert "forged" in err and "broken" in err
    with pytest.raises(ValueError, match="status"):
        write_status(run_dir, TRIAL, "finished")


def test_a_run_directory_of_tunes_layout_is_migrated_from_its_json(tmp_path):
    """Before the records, results came from Tune's experiment_state (JSON strings per trial) and result.json."""
    run_dir = str(tmp_path / "run")
    ckpt = _checkpoint(run_dir, TRIAL["id"], "checkpoint_1")
    experiment = os.path.join(run_dir, "tune", "t")
    os.makedirs(os.path.join(experiment, TRIAL["id"]))
    unfinished = {**TRIAL, "id": "t-nf2-g64-r4-lr0.001"}
    trial_data = [[json.dumps({"config": {"trial": t}, "status": s}), "80049…pickled, never decoded"]
                  for t, s in ((TRIAL, "TERMINATED"), (unfinished, "RUNNING"))]
    with open(os.path.join(experiment, "experiment_state-2026-01-01_00-00-00.json"), "w") as f:
        json.dump({"trial_data": trial_data}, f)
    with open(os.path.join(experiment, TRIAL["id"], "result.json"), "w") as f:
        f.write(json.dumps({"step": 4, "max_steps": 8, "checkpoint_path": ckpt}) + "\n")
    states = {s.trial["id"]: s for s in read_states(run_dir)}
    assert states[TRIAL["id"]].status == "stopped early" and states[unfinished["id"]].status == "running"
    assert latest_checkpoint(run_dir, TRIAL["id"]) == ckpt
    migrate_tune_layout(run_dir)  # once only: the records now exist
    assert [len(s.reports) for s in read_states(run_dir)] == [0, 1]


def _spec(tmp_path, lr: float = 1e-3):
    (tmp_path / "labels.csv").write_text("text,label\na,x\nb,y\n")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "r", "model": "tiny-bert", "cache": {"uri": str(tmp_path / "cache")},
        "tasks": [{"name": "t", "type": "classification", "train_file": str(tmp_path / "labels.csv")}],
        "training": {"max_steps": 8, "lr": lr}}))
    return load_spec(str(path))


def test_a_run_directory_is_claimed_once_per_spec(tmp_path):
    run_dir = str(tmp_path / "run")
    spec = _spec(tmp_path)
    assert claim_run_dir(run_dir, spec) is False  # new: the resolved spec is written
    assert os.listdir(run_dir) == ["spec.yaml"] and read_run_spec(run_dir) == spec
    assert claim_run_dir(run_dir, spec) is True  # the same spec again: the run resumes
    with pytest.raises(SpecError, match=r"different spec \(differs in training.lr\)"):
        claim_run_dir(run_dir, _spec(tmp_path, lr=2e-3))
    with open(os.path.join(run_dir, "spec.yaml"), "w") as f:
        f.write("name: [")
    with pytest.raises(SpecError, match="holds a spec this loftune cannot read"):
        claim_run_dir(run_dir, spec)


def test_only_a_new_empty_or_loftune_directory_may_become_a_run_directory(tmp_path):
    check_run_dir(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_run_dir(str(tmp_path / "empty"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(SpecError, match="not a loftune run directory"):
        check_run_dir(str(tmp_path / "mine"))
    with pytest.raises(SpecError, match="not a directory"):
        check_run_dir(str(tmp_path / "mine" / "notes.txt"))
    with pytest.raises(SpecError, match="no spec.yaml"):
        read_run_spec(str(tmp_path / "empty"))
    (tmp_path / "mine" / "spec.yaml").write_text("")
    check_run_dir(str(tmp_path / "mine"))  # one loftune made (and writes and deletes inside)
