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

from orchestrator.run_dir import DONE, FAILED, FINISHED, PENDING, RUNNING, STOPPED_EARLY

TABLE_EVERY_SECONDS = 60.0  # also reprint the table this often while trials run, for long trials


class TrialTable:
    """The rows of the trial table (status, step, loss, metric per trial) and their text: plain data, no terminal."""

    def __init__(self, max_steps: dict[str, int], metric: str):
        self.max_steps, self.metric = max_steps, metric
        self.rows: dict[str, dict] = {}

    def row(self, trial_id: str) -> dict:
        """The trial's row, made (pending, step 0) on first use."""
        if trial_id not in self.rows:
            self.rows[trial_id] = {"status": PENDING, "step": 0, "max_steps": self.max_steps.get(trial_id, 0),
                                   "loss": None, "metric": None}
        return self.rows[trial_id]

    def advance(self, trial_id: str, step: int) -> int:
        """Move the trial to `step` (never back); returns the steps it gained, for the bar."""
        row = self.row(trial_id)
        gained = max(0, step - row["step"])
        row["step"] += gained
        return gained

    def fill(self, trial_id: str, result: dict) -> None:
        """Take the loss and the sweep metric from a report, where it has them."""
        row = self.row(trial_id)
        if "loss" in result:
            row["loss"] = result["loss"]
        if self.metric in result:
            row["metric"] = result[self.metric]

    def complete(self, trial_id: str) -> None:
        """Tune ended the trial without an error: done if it reached its last step, else ASHA stopped it."""
        row = self.row(trial_id)
        row["status"] = DONE if row["step"] >= row["max_steps"] else STOPPED_EARLY

    def add_earlier(self, trial_id: str, status: str, reports: list[dict]) -> int:
        """A trial from an earlier session: finished, or to continue from its last checkpoint. Returns the
        steps it counts for (a finished trial's last step, else its last checkpoint's)."""
        row = self.row(trial_id)
        for report in reports:
            self.fill(trial_id, report)
        if status in FINISHED:
            row["status"] = f"{status} (earlier run)"
            return self.advance(trial_id, max((r.get("step", 0) for r in reports), default=0))
        resume_at = max((r.get("step", 0) for r in reports if r.get("checkpoint_path")), default=0)
        row["status"] = "to resume" if resume_at else "to restart"
        return self.advance(trial_id, resume_at)

    def counts(self) -> str:
        """How many trials have each status, in the order the statuses first appear, e.g. '2 done, 1 running'."""
        statuses = [r["status"] for r in self.rows.values()]
        return ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))

    def text(self) -> str:
        """The table: one line per trial, in trial-id order, under a header."""
        width = max((len(t) for t in self.rows), default=5)
        lines = [f"{'trial':<{width}}  {'status':<18} {'step':>11} {'loss':>8} {self.metric:>16}"]
        for trial_id, r in sorted(self.rows.items()):
            loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
            metric = f"{r['metric']:.4f}" if r["metric"] is not None else "-"
            lines.append(f"{trial_id:<{width}}  {r['status']:<18} {r['step']:>5}/{r['max_steps']:<5} {loss:>8} "
                         f"{metric:>16}")
        return "\n".join(lines)


class TrialProgress(tune.Callback):
    """Step bar and trial table for the trials of one task."""

    def __init__(self, task: str, max_steps: dict[str, int], metric: str,
                 earlier: dict[str, tuple[str, list[dict]]] | None = None):
        """`earlier`: trial id -> (recorded status, reports) of the trials earlier sessions ran."""
        self.task, self.max_steps, self.metric = task, max_steps, metric
        self.earlier = earlier or {}
        self.table = TrialTable(max_steps, metric)
        self._bar: tqdm | None = None
        self._last_table = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bar": None, "table": TrialTable(self.max_steps, self.metric)}

    # ------------------------------------------------------------------------------------- Tune hooks

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._bar is None:  # first step of this process: count what earlier sessions did
            self._bar = tqdm(total=sum(self.max_steps.values()), desc=f"{self.task} steps", unit="step",
                             file=sys.stderr, dynamic_ncols=True)
            for trial_id, (status, reports) in self.earlier.items():
                self._bar.update(self.table.add_earlier(trial_id, status, reports))
            self._print_table()
        elif time.monotonic() - self._last_table > TABLE_EVERY_SECONDS:
            self._print_table()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.table.row(_trial_id(trial))["status"] = RUNNING
        self._print_table()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        trial_id = _trial_id(trial)
        gained = self.table.advance(trial_id, result.get("step", self.table.row(trial_id)["step"]))
        if self._bar is not None:
            self._bar.update(gained)
        self.table.fill(trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.table.complete(_trial_id(trial))
        self._print_table()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.table.row(_trial_id(trial))["status"] = FAILED
        self._print_table()

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _print_table(self) -> None:
        """Print the trial table above the bar (and show the status counts beside it)."""
        self._last_table = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(self.table.counts(), refresh=False)
            self._bar.write(self.table.text(), file=sys.stderr)
        else:
            print(self.table.text(), file=sys.stderr)


def _trial_id(trial) -> str:
    """The loftune trial id of a Tune trial (its config holds the whole Trial as a dict)."""
    return trial.config["trial"]["id"]
