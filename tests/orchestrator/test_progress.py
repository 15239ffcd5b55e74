"""The sweep's progress display from real trial records: each trial's status, step and metrics, the status
counts, the table's text, and the Tune callback that prints them (driven with Tune's own Trial objects)."""

from __future__ import annotations

import os
import pickle

import pytest
from ray.tune.experiment import Trial as TuneTrial

from orchestrator.progress import TrialProgress, TrialTable
from orchestrator.trial_records import append_report, read_states, write_status

MAX_STEPS = {"t-a": 8, "t-b": 8, "t-c": 8, "t-d": 8}


def _trial(trial_id: str) -> dict:
    return {"id": trial_id, "task": "t", "bits": 4, "group_size": 64, "rank": 4, "lr": 0.001, "seed": 0,
            "training": {}, "base": "b"}


@pytest.fixture
def earlier(tmp_path) -> dict[str, tuple[str, list[dict]]]:
    """What an interrupted earlier session left: t-a done, t-b running with a checkpoint at step 4, t-c failed
    before its first checkpoint; t-d never started. Read back as the sweep reads it for the progress display."""
    run_dir = str(tmp_path / "run")
    write_status(run_dir, _trial("t-a"), "done")
    for step in (4, 8):
        append_report(run_dir, "t-a", {"step": step, "loss": 1.0 / step, "eval_accuracy": step / 10})
    write_status(run_dir, _trial("t-b"), "running")
    checkpoint = os.path.join(run_dir, "train", "t-b", "attempt", "checkpoint_4")
    os.makedirs(checkpoint)
    for name in ("trainable.safetensors", "state.json"):
        open(os.path.join(checkpoint, name), "w").close()
    append_report(run_dir, "t-b", {"step": 4, "loss": 0.5, "checkpoint_path": checkpoint})
    append_report(run_dir, "t-b", {"step": 6, "loss": 0.4})  # after its checkpoint: done again on resume
    write_status(run_dir, _trial("t-c"), "failed")
    append_report(run_dir, "t-c", {"step": 2, "loss": 2.0})
    return {s.trial["id"]: (s.status, s.reports) for s in read_states(run_dir)}


def test_earlier_trials_count_their_finished_or_checkpointed_steps(earlier):
    table = TrialTable(MAX_STEPS, "eval_accuracy")
    gained = {trial_id: table.add_earlier(trial_id, status, reports) for trial_id, (status, reports) in earlier.items()}
    assert gained == {"t-a": 8, "t-b": 4, "t-c": 0}  # a resumed trial restarts from its last checkpoint
    assert {t: r["status"] for t, r in table.rows.items()} == {
        "t-a": "done (earlier run)", "t-b": "to resume", "t-c": "to restart"}
    assert (table.rows["t-a"]["loss"], table.rows["t-a"]["metric"]) == (0.125, 0.8)  # the latest report's
    assert table.rows["t-b"]["loss"] == 0.4 and table.rows["t-b"]["metric"] is None
    table.row("t-d")
    assert table.counts() == "1 done (earlier run), 1 to resume, 1 to restart, 1 pending"


def test_the_table_text_has_a_line_per_trial_in_id_order(earlier):
    table = TrialTable(MAX_STEPS, "eval_accuracy")
    for trial_id, (status, reports) in reversed(earlier.items()):
        table.add_earlier(trial_id, status, reports)
    header, *lines = table.text().splitlines()
    assert header.split() == ["trial", "status", "step", "loss", "eval_accuracy"]
    assert [line.split()[0] for line in lines] == ["t-a", "t-b", "t-c"]
    assert lines[0].split()[-4:] == ["run)", "8/8", "0.1250", "0.8000"]
    assert lines[1].split()[1:] == ["to", "resume", "4/8", "0.4000", "-"]
    assert lines[2].split()[1:] == ["to", "restart", "0/8", "2.0000", "-"]


def test_live_results_move_a_trial_forward_only_and_end_it_done_or_stopped():
    table = TrialTable({"x": 10, "y": 10}, "eval_loss")
    assert table.advance("x", 6) == 6 and table.advance("x", 4) == 0 and table.rows["x"]["step"] == 6
    table.fill("x", {"loss": 0.3, "eval_loss": 0.2, "step": 6})
    assert (table.rows["x"]["loss"], table.rows["x"]["metric"]) == (0.3, 0.2)
    table.complete("x")  # Tune ended it before its last step: ASHA stopped it
    table.advance("y", 10)
    table.complete("y")
    assert [table.rows[t]["status"] for t in ("x", "y")] == ["stopped early", "done"]


def test_the_callback_prints_the_earlier_trials_and_follows_tunes_hooks(earlier, capsys):
    progress = TrialProgress("t", MAX_STEPS, "eval_accuracy", earlier=earlier)
    progress.on_step_begin(0, [])
    shown = capsys.readouterr().err
    assert "t-b" in shown and "to resume" in shown and "done (earlier run)" in shown
    resumed, fresh = (TuneTrial("__fake", config={"trial": _trial(t)}, stub=True) for t in ("t-b", "t-d"))
    progress.on_trial_start(0, [], resumed)
    progress.on_trial_result(0, [], resumed, {"step": 8, "loss": 0.2, "eval_accuracy": 0.9})
    progress.on_trial_complete(0, [], resumed)
    progress.on_trial_start(0, [], fresh)
    progress.on_trial_result(0, [], fresh, {"step": 3, "loss": 0.7})
    progress.on_trial_error(0, [], fresh)
    assert progress.table.counts() == "1 done (earlier run), 1 done, 1 to restart, 1 failed"
    assert progress._bar.n == 8 + 8 + 0 + 3  # the bar counts every step the table shows
    progress.on_experiment_end([])
    assert "19/32" in capsys.readouterr().err and progress._bar is None


def test_the_callback_pickles_without_its_terminal_state(earlier):
    """Tune pickles its callbacks into the experiment state: the bar and the rows stay behind."""
    progress = TrialProgress("t", MAX_STEPS, "eval_accuracy", earlier=earlier)
    progress.on_step_begin(0, [])
    restored = pickle.loads(pickle.dumps(progress))
    assert restored._bar is None and restored.table.rows == {} and restored.earlier == earlier
    progress.on_experiment_end([])
