"""loftune's own record of every trial: the only state that a resume, a retry or a report reads back.

    <run_dir>/trials/<trial id>/trial.json      {"trial": {...}, "status": ..., "error": ..., "updated": ...}
    <run_dir>/trials/<trial id>/reports.jsonl   one JSON object per report: step, loss, eval metrics, and
                                                `checkpoint`, relative to the run directory, when it saved one

Status words (orchestrator/run_dir.py): running | done | stopped early | failed. The sweep's driver writes them
as results arrive (a Tune callback in orchestrator/sweep.py); everything else only reads. Tune's and Train's own
folders (`tune/`, `train/`) are never read back: Tune keeps pickles there (`tuner.pkl`, its experiment state), and
a run directory on shared storage is not trusted to hold only what loftune wrote. Checkpoints are read as
safetensors and JSON, and only from inside `train/<trial id>/` of the run directory they are recorded in,
so a run directory can be moved or copied and still resumes.

Run directories from before these records (Tune's `experiment_state-*.json` and per-trial `result.json`,
both JSON) are converted once by `migrate_tune_layout`; the pickled fields in them are never decoded.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field

from orchestrator.run_dir import (
    DONE,
    FAILED,
    REPORTS_FILE,
    RUNNING,
    STATUSES,
    STOPPED_EARLY,
    TRAIN_DIR,
    TRIAL_FILE,
    TRIALS_DIR,
    TUNE_DIR,
    train_dir,
    trial_dir,
)
from orchestrator.safe_paths import is_component, is_inside

CHECKPOINT_FILES = ("trainable.safetensors", "state.json")  # workers.checkpoint's TRAINABLE_FILE, STATE_FILE


@dataclass
class TrialState:
    """One trial as its record tells it: the trial's definition (a dict), its status and every report."""

    trial: dict
    status: str
    reports: list[dict] = field(default_factory=list)
    error: str | None = None


def _write_json(path: str, data: dict) -> None:
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def write_status(run_dir: str, trial: dict, status: str, error: str | None = None) -> None:
    """Record `trial` (its definition) with `status`; creates the record on first use."""
    if status not in STATUSES:
        raise ValueError(f"status: expected one of {STATUSES}, got {status!r}")
    folder = trial_dir(run_dir, trial["id"])
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, TRIAL_FILE), {"trial": trial, "status": status, "error": error,
                                                  "updated": time.time()})


def append_report(run_dir: str, trial_id: str, report: dict) -> None:
    """Append one report. `checkpoint_path` (absolute, from Ray Train) is stored relative to the run directory."""
    row = {k: v for k, v in report.items() if isinstance(v, str | int | float | bool) or v is None}
    path = row.pop("checkpoint_path", None)
    if path:
        if not is_inside(path, train_dir(run_dir, trial_id)):
            raise ValueError(f"trial {trial_id}: checkpoint {path} is not in the run directory's {TRAIN_DIR}/")
        row["checkpoint"] = os.path.relpath(os.path.realpath(path), os.path.realpath(run_dir))
    folder = trial_dir(run_dir, trial_id)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, REPORTS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_states(run_dir: str) -> list[TrialState]:
    """Every trial record of a run directory, in trial-id order; unreadable records are skipped with a warning."""
    try:
        migrate_tune_layout(run_dir)
    except OSError as exc:  # a read-only copy of an old run: its results are then read as not started
        print(f"loftune: cannot write trial records into {run_dir} ({exc.strerror})", file=sys.stderr)
    root = os.path.join(run_dir, TRIALS_DIR)
    names = sorted(n for n in os.listdir(root) if is_component(n)) if os.path.isdir(root) else []
    states = []
    for name in names:
        state = _read_state(run_dir, name)
        if state is not None:
            states.append(state)
    return states


def _read_state(run_dir: str, trial_id: str) -> TrialState | None:
    folder = trial_dir(run_dir, trial_id)
    try:
        with open(os.path.join(folder, TRIAL_FILE)) as f:
            data = json.load(f)
        trial, status = data["trial"], data["status"]
        if not isinstance(trial, dict) or trial.get("id") != trial_id or status not in STATUSES:
            raise ValueError("its trial id or status is not one loftune writes")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"loftune: ignoring the unreadable trial record {folder} ({exc})", file=sys.stderr)
        return None
    reports = [_with_checkpoint(run_dir, trial_id, r) for r in read_jsonl(os.path.join(folder, REPORTS_FILE))]
    return TrialState(trial, status, reports, data.get("error"))


def _with_checkpoint(run_dir: str, trial_id: str, report: dict) -> dict:
    """The report with `checkpoint_path`: its checkpoint as an absolute path, if it is one of this trial's."""
    rel = report.pop("checkpoint", None)
    if isinstance(rel, str):
        path = os.path.join(run_dir, rel)
        if is_inside(path, train_dir(run_dir, trial_id)) and is_checkpoint(path):
            report["checkpoint_path"] = os.path.abspath(path)
    return report


def is_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in CHECKPOINT_FILES)


def latest_checkpoint(run_dir: str, trial_id: str) -> str | None:
    """The newest checkpoint this trial recorded that is still there (a retried or resumed trial continues there)."""
    state = _read_state(run_dir, trial_id) if os.path.isdir(trial_dir(run_dir, trial_id)) else None
    paths = [r["checkpoint_path"] for r in (state.reports if state else []) if "checkpoint_path" in r]
    return paths[-1] if paths else None


def read_jsonl(path: str) -> list[dict]:
    """JSON objects, one per line; a line cut short by a crash (or not an object) is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------- run dirs before the records

TUNE_STATUS = {"TERMINATED": DONE, "ERROR": FAILED}  # anything else was interrupted: running


def migrate_tune_layout(run_dir: str) -> None:
    """Write records for a run directory made before them, from Tune's JSON files (once; pickles left encoded)."""
    if os.path.isdir(os.path.join(run_dir, TRIALS_DIR)):
        return
    for state_file in glob.glob(os.path.join(run_dir, TUNE_DIR, "*", "experiment_state-*.json")):
        for trial, status in _tune_trials(state_file):
            if not is_component(trial.get("id")):
                continue
            reports = read_jsonl(os.path.join(os.path.dirname(state_file), trial["id"], "result.json"))
            for report in reports:
                path = report.get("checkpoint_path")
                if path and not is_inside(path, train_dir(run_dir, trial["id"])):
                    report.pop("checkpoint_path")
                append_report(run_dir, trial["id"], report)
            step = max((r.get("step", 0) for r in reports), default=0)
            if status == DONE and step < max((r.get("max_steps", 0) for r in reports), default=0):
                status = STOPPED_EARLY
            write_status(run_dir, trial, status)
    os.makedirs(os.path.join(run_dir, TRIALS_DIR), exist_ok=True)


def _tune_trials(state_file: str) -> list[tuple[dict, str]]:
    try:
        with open(state_file) as f:
            data = json.load(f)
        states = [json.loads(trial_json) for trial_json, _ in data.get("trial_data", [])]
        return [(s["config"]["trial"], TUNE_STATUS.get(s.get("status"), RUNNING)) for s in states]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"loftune: ignoring Tune's unreadable state {state_file} ({exc})", file=sys.stderr)
        return []
