"""A run's results, read back from its directory alone (orchestrator/run_dir.py): the trial records, the
leaderboard, results.json.

Only loftune's JSON records are read (never Tune's files, which hold pickles), so `loftune results` works
without Ray Tune, on a finished, running or interrupted run. Importing it sets nothing in the process (no
environment variables, no logger levels): that is the command line's setup, in `cli.main`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

from orchestrator.plan import Trial
from orchestrator.run_dir import INCOMPLETE, LEADERBOARD_FILE, RESULTS_FILE, RUNNING
from orchestrator.spec import JobSpec, metric_for
from orchestrator.trial_records import read_states
from workers.entry_format import FULL_PRECISION_BITS, FULL_PRECISION_METHOD


@dataclass
class TrialRecord:
    """One trial as the run directory tells it."""

    trial: Trial
    status: str  # done | stopped early | failed | incomplete (recorded as running: interrupted)
    max_steps: int
    history: list[dict] = field(default_factory=list)  # every report, in order (across resumed sessions)

    @property
    def step(self) -> int:
        return max((r.get("step", 0) for r in self.history), default=0)

    @property
    def final(self) -> dict:
        """The latest value of every metric (evaluations are only in some reports)."""
        out: dict = {}
        for report in self.history:
            out.update({k: v for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        return out

    @property
    def seconds(self) -> float:
        """Training time over every session that ran the trial (Tune's clock restarts in each)."""
        last: dict = {}
        for report in self.history:
            last[report.get("session")] = float(report.get("time_total_s", 0.0))
        return sum(last.values())

    @property
    def checkpoint(self) -> str | None:
        """The newest checkpoint folder this trial reported."""
        paths = [r["checkpoint_path"] for r in self.history if r.get("checkpoint_path")]
        return paths[-1] if paths else None


def read_trials(run_dir: str, spec: JobSpec) -> list[TrialRecord]:
    """Every recorded trial of the spec's tasks (a trial not started yet has no record)."""
    tasks = {t.name for t in spec.tasks}
    records = []
    for state in read_states(run_dir):
        try:
            trial = Trial.from_dict(state.trial)
        except TypeError:  # a record of another loftune's Trial fields: not this run's
            continue
        if trial.task not in tasks:
            continue
        # trials report their max_steps (derived from `epochs` where given); the spec's before the first report
        reported = [h["max_steps"] for h in state.reports if "max_steps" in h]
        max_steps = reported[-1] if reported else trial.training_settings(spec.training).max_steps
        status = INCOMPLETE if state.status == RUNNING else state.status
        records.append(TrialRecord(trial, status, max_steps, state.reports))
    return records


# ------------------------------------------------------------------------------------------- leaderboard


def leaderboard(records: list[TrialRecord], spec: JobSpec) -> list[dict]:
    """One row per trial, best first within each task (by the sweep metric)."""
    rows = []
    types = {t.name: t.type for t in spec.tasks}
    for task in spec.tasks:
        metric, mode = metric_for(spec.sweep, task.type)
        task_records = [r for r in records if r.trial.task == task.name]
        ranked = sorted(task_records, key=lambda r: _sort_key(r, metric, mode))
        for place, r in enumerate(ranked, 1):
            final = r.final
            row = {"task": r.trial.task, "place": place, "trial": r.trial.id, "status": r.status,
                   "bits": r.trial.bits, "group_size": r.trial.group_size, "method": method_of(r.trial, spec),
                   "rank": r.trial.rank, "lr": r.trial.lr,
                   "metric": metric, "value": final.get(metric), "step": r.step, "max_steps": r.max_steps,
                   "loss": final.get("loss"), "seconds": round(r.seconds, 1), "base": r.trial.base}
            row.update({k: v for k, v in sorted(final.items()) if k.startswith("eval_") and k != metric})
            row.update({f"training.{k}": v for k, v in r.trial.training.items()})
            row["type"] = types[r.trial.task]
            rows.append(row)
    return rows


def method_of(trial: Trial, spec: JobSpec) -> str:
    """How the trial's base was made: the spec's method, or 'lora' for the full-precision control (bits 16)."""
    if trial.bits == FULL_PRECISION_BITS:
        return FULL_PRECISION_METHOD
    return trial.method or spec.quantization.method


def _sort_key(record: TrialRecord, metric: str, mode: str) -> tuple:
    value = record.final.get(metric)
    if value is None:
        return (1, 0.0, record.trial.id)
    return (0, -value if mode == "max" else value, record.trial.id)


def best_records(records: list[TrialRecord], spec: JobSpec) -> dict[str, TrialRecord]:
    """The best finished trial with a checkpoint, per task."""
    best = {}
    for task in spec.tasks:
        metric, mode = metric_for(spec.sweep, task.type)
        done = [r for r in records if r.trial.task == task.name and r.checkpoint and metric in r.final]
        if done:
            best[task.name] = min(done, key=lambda r: _sort_key(r, metric, mode))
    return best


def write_leaderboard(run_dir: str, rows: list[dict]) -> str:
    """leaderboard.csv (every column any row has) and results.json; returns the CSV's path."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = os.path.join(run_dir, LEADERBOARD_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    tmp = os.path.join(run_dir, RESULTS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"leaderboard": rows}, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, RESULTS_FILE))
    return path


def format_table(rows: list[dict]) -> str:
    """The leaderboard as an aligned text table."""
    if not rows:
        return "(no trials yet)"
    columns = ["task", "place", "trial", "status", "bits", "group_size", "method", "rank", "lr", "metric", "value",
               "step", "loss", "seconds", "base"]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
