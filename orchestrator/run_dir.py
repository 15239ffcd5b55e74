"""The run directory: where each of its files lives, claiming one for a spec, the spec it was started with, and
the words a trial's status is recorded in. Light on purpose (no Ray, torch or tqdm): everything that reads or
writes a run directory imports it.

    <run_dir>/spec.yaml                              the resolved spec the run was started with (`claim_run_dir`)
    <run_dir>/trials/<trial id>/trial.json           loftune's record of each trial (orchestrator/trial_records.py)
    <run_dir>/trials/<trial id>/reports.jsonl        its reports, one JSON object per line
    <run_dir>/train/<trial id>/<attempt>/checkpoint_*   the trial's Ray Train runs and checkpoints (sweep.py)
    <run_dir>/tune/<experiment>/                     Tune's state in run directories made before the records (read
                                                     once, as JSON, by trial_records.migrate_tune_layout)
    <run_dir>/leaderboard.csv, results.json          the leaderboard (results.py)
    <run_dir>/plots/*.png                            plots.py
    <run_dir>/best/<task>/                           the best trial's export per task (best.py)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import yaml

from orchestrator.errors import SpecError
from orchestrator.safe_paths import check_component

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec

SPEC_FILE = "spec.yaml"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
REPORTS_FILE = "reports.jsonl"
TRAIN_DIR = "train"
TUNE_DIR = "tune"
LEADERBOARD_FILE = "leaderboard.csv"
RESULTS_FILE = "results.json"
PLOTS_DIR = "plots"
BEST_DIR = "best"

# A trial's status as its record holds it: the sweep's driver writes them, everything else only reads.
RUNNING, DONE, STOPPED_EARLY, FAILED = "running", "done", "stopped early", "failed"
STATUSES = (RUNNING, DONE, STOPPED_EARLY, FAILED)
FINISHED = (DONE, STOPPED_EARLY)  # kept on resume; a failed or interrupted trial runs again
# The words of the results and of the progress table for a trial that is not finished and that nothing runs
INCOMPLETE = "incomplete"  # recorded as running, read back when no sweep runs it: it was interrupted
PENDING = "pending"  # not started yet
UNFINISHED = (INCOMPLETE, PENDING)  # a task whose sweep returned with one of these was interrupted


def trial_dir(run_dir: str, trial_id: str) -> str:
    """`<run_dir>/trials/<trial id>`: the trial's record (the id must be one path component)."""
    return os.path.join(run_dir, TRIALS_DIR, check_component(trial_id, "trial id"))


def train_dir(run_dir: str, trial_id: str) -> str:
    """`<run_dir>/train/<trial id>`: the only place a trial's checkpoints are read from."""
    return os.path.join(run_dir, TRAIN_DIR, check_component(trial_id, "trial id"))


def default_run_dir(spec: JobSpec) -> str:
    """`$LOFTUNE_RUNS/<name>`, else `runs/<name>`: no timestamp, so running a spec again resumes it."""
    return os.path.join(os.environ.get("LOFTUNE_RUNS", "runs"), spec.name)


def check_run_dir(run_dir: str) -> None:
    """A run directory is new, empty, or one loftune made (it holds spec.yaml): loftune writes and deletes
    inside it (`best/<task>` is replaced on every run), so a folder of the user's must never become one."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise SpecError([f"--out: {run_dir} exists and is not a directory"], "run directory")
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not os.path.isfile(os.path.join(run_dir, SPEC_FILE)):
        raise SpecError([f"--out: {run_dir} is not empty and is not a loftune run directory (no {SPEC_FILE}); "
                         f"choose a new or empty directory"], "run directory")


def claim_run_dir(run_dir: str, spec: JobSpec) -> bool:
    """Write the resolved spec into the run directory; True if the directory already holds this same spec.

    A directory holding a different spec is refused (SpecError naming the fields that differ): resuming
    with other settings would mix two experiments in one leaderboard. The earlier spec is resolved again
    first, so a field that a newer loftune added (with its default) does not count as a difference.
    """
    from orchestrator.spec import spec_to_dict  # spec.py imports torch (workers.quant): only when a spec is read

    resolved = spec_to_dict(spec)
    path = os.path.join(run_dir, SPEC_FILE)
    if os.path.exists(path):
        try:
            earlier = spec_to_dict(read_run_spec(run_dir))
        except SpecError as exc:
            raise SpecError([f"{run_dir} holds a spec this loftune cannot read ({'; '.join(exc.problems)}); "
                             f"choose another --out"], "run directory") from None
        if earlier == resolved:
            return True
        differ = _differences(earlier, resolved)
        raise SpecError([f"{run_dir} holds a run of a different spec (differs in {', '.join(differ[:8])}); "
                         f"run it with the same spec to resume, or choose another --out"], "run directory")
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)
    os.replace(path + ".tmp", path)
    return False


def _differences(a, b, path: str = "") -> list[str]:
    """Dotted paths where two spec dicts differ, e.g. ['training.lr', 'tasks[0].max_length']."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b))
                for d in _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "(all)"]


def read_run_spec(run_dir: str) -> JobSpec:
    """The resolved spec a run directory was started with."""
    from orchestrator.spec import read_spec_file, spec_from_dict  # torch, through workers.quant: see claim_run_dir

    path = os.path.join(run_dir, SPEC_FILE)
    if not os.path.exists(path):
        raise SpecError([f"{run_dir} is not a loftune run directory (no {SPEC_FILE})"], "results")
    data = read_spec_file(path, path)
    problems: list[str] = []
    spec = spec_from_dict(data, problems)
    if problems:
        raise SpecError(problems, path)
    return spec
