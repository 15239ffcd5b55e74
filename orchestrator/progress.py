"""Live progress of a sweep on stderr: one bar over every trial's steps, and a table of trials whenever a
trial starts, finishes, is stopped early or fails.

The callback runs in the driver (Tune's controller loop). Tune pickles it into its (private) experiment
state, so it holds plain data only; the bar is made on first use. Trials of earlier sessions come from
loftune's records: finished ones are shown as such, interrupted ones continue from their last checkpoint.
"""

from __future__ import annotations

import sys
import time

from ray import tune
from tqdm import tqdm

from orchestrator.trial_records import FINISHED

TABLE_EVERY_SECONDS = 60.0  # also reprint the table this often while trials run, for long trials


class TrialProgress(tune.Callback):
    """Step bar and trial table for the trials of one task."""

    def __init__(self, task: str, max_steps: dict[str, int], metric: str,
                 earlier: dict[str, tuple[str, list[dict]]] | None = None):
        """`earlier`: trial id -> (recorded status, reports) of the trials earlier sessions ran."""
        self.task, self.max_steps, self.metric = task, max_steps, metric
        self.earlier = earlier or {}
        self._rows: dict[str, dict] = {}
        self._bar: tqdm | None = None
        self._last_table = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bar": None, "_rows": {}}

    # ------------------------------------------------------------------------------------- Tune hooks

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._bar is None:  # first step of this process: count what earlier sessions did
            self._bar = tqdm(total=sum(self.max_steps.values()), desc=f"{self.task} steps", unit="step",
                             file=sys.stderr, dynamic_ncols=True)
            for trial_id, (status, reports) in self.earlier.items():
                self._show_earlier(self._row_of(trial_id), status, reports)
            self._print_table()
        elif time.monotonic() - self._last_table > TABLE_EVERY_SECONDS:
            self._print_table()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._row(trial)["status"] = "running"
        self._print_table()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        row = self._row(trial)
        self._advance(row, result.get("step", row["step"]))
        self._fill(row, result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        row = self._row(trial)
        row["status"] = "done" if row["step"] >= row["max_steps"] else "stopped early"
        self._print_table()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._row(trial)["status"] = "failed"
        self._print_table()

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------------------------------ display

    def _show_earlier(self, row: dict, status: str, reports: list[dict]) -> None:
        """A trial from an earlier session: finished, or to continue from its last checkpoint."""
        for report in reports:
            self._fill(row, report)
        if status in FINISHED:
            row["status"] = f"{status} (earlier run)"
            self._advance(row, max((r.get("step", 0) for r in reports), default=0))
            return
        resume_at = max((r.get("step", 0) for r in reports if r.get("checkpoint_path")), default=0)
        row["status"] = "to resume" if resume_at else "to restart"
        self._advance(row, resume_at)

    def _row(self, trial) -> dict:
        return self._row_of(trial.config["trial"]["id"])

    def _row_of(self, trial_id: str) -> dict:
        if trial_id not in self._rows:
            self._rows[trial_id] = {"status": "pending", "step": 0, "max_steps": self.max_steps.get(trial_id, 0),
                                    "loss": None, "metric": None}
        return self._rows[trial_id]

    def _advance(self, row: dict, step: int) -> None:
        if self._bar is not None and step > row["step"]:
            self._bar.update(step - row["step"])
        row["step"] = max(row["step"], step)

    def _fill(self, row: dict, result: dict) -> None:
        if "loss" in result:
            row["loss"] = result["loss"]
        if self.metric in result:
            row["metric"] = result[self.metric]

    def _counts(self) -> str:
        statuses = [r["status"] for r in self._rows.values()]
        return ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))

    def _print_table(self) -> None:
        """Print the trial table above the bar (and show the status counts beside it)."""
        self._last_table = time.monotonic()
        width = max((len(t) for t in self._rows), default=5)
        lines = [f"{'trial':<{width}}  {'status':<18} {'step':>11} {'loss':>8} {self.metric:>16}"]
        for trial_id, r in sorted(self._rows.items()):
            loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
            metric = f"{r['metric']:.4f}" if r["metric"] is not None else "-"
            lines.append(f"{trial_id:<{width}}  {r['status']:<18} {r['step']:>5}/{r['max_steps']:<5} {loss:>8} "
                         f"{metric:>16}")
        text = "\n".join(lines)
        if self._bar is not None:
            self._bar.set_postfix_str(self._counts(), refresh=False)
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)
