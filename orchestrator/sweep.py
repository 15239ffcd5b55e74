"""Run a plan's trials under Ray Tune: one Tune experiment per task and session, one Ray Train job per trial.

    plan.trials_for(task) - finished trials (loftune's records) -> Tuner(grid over the rest) -> run_trial
        (a Tune function trainable) -> TorchTrainer (DeepSpeed workers, workers/train_loop.py)
        -> TuneReportCallback -> TrialRecorder (loftune's records) and TrialProgress (stderr)

Tune searches nothing itself: the planner already expanded the search space (so the bases are known and
built before any trial starts), and Tune runs exactly those trials, `max_concurrent_trials` at a time, with
ASHA early stopping when asked. Resuming rests on loftune's own records only (orchestrator/trial_records.py):
finished trials are kept, the others run in a fresh Tune experiment, each from its last recorded checkpoint.
`Tuner.restore` is never called. Tune pickles its state (and unpickles some of it, e.g. a trial's error, when
`fit` returns), so its experiment lives in a private temporary folder of the driver (mode 0700), removed when
the sweep ends, and never in the run directory, which may sit on shared storage that others can write to.
Failures are retried at both levels: a worker group restarts inside its Train run, and a trial that still
fails is retried by Tune, from its last checkpoint too (every Train run of a trial is a fresh one,
`train/<trial>/<attempt>/`, so Train never reads an earlier run's files either). One cost of a fresh
experiment: on a resumed sweep, ASHA compares only the trials that run in the new session (the finished ones are
kept as they ended, not fed back into its rungs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from ray import tune

from orchestrator.plan import TRIAL_DRIVER_CPUS, Plan, Trial
from orchestrator.progress import TrialProgress
from orchestrator.run_dir import DONE, FAILED, FINISHED, RUNNING, STOPPED_EARLY, train_dir
from orchestrator.spec import Adapter, metric_for
from orchestrator.trial_records import append_report, latest_checkpoint, read_states, write_status
from workers.tasks import TaskSpec
from workers.train_settings import TrainSettings

TRIAL_RETRIES = 2  # Tune-level retries of a trial whose Train run failed for good
WORKER_RESTARTS = 2  # Train-level restarts of a trial's worker group from its latest checkpoint

# Each report carries only the metrics of that moment (evaluation is every M steps), so Tune must accept
# results that lack the sweep metric; ASHA skips them. Tune's driver reads it as a sweep runs: `run_task` sets it.
# (Tune's INFO lines, which the progress table replaces, are silenced with the other libraries: orchestrator/quiet.py.)
TUNE_ENV = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of one task needs besides its own point (sent once, through the object store)."""

    cache_uri: str
    run_dir: str
    task: TaskSpec
    training: TrainSettings
    adapter: Adapter  # the spec's: each trial takes it at its rank (Trial.adapter_settings)
    workers: int
    cpus_per_worker: int
    gpus_per_worker: int


def run_trial(config: dict, settings: TrialSettings) -> None:
    """Tune function trainable: fine-tune one trial as a Ray Train job; its reports become Tune results.

    It continues from the trial's last recorded checkpoint (an earlier session's, or this session's before
    Tune retried it), in a Train run of its own.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.cache import BaseCache
    from orchestrator.finetune import Resources, job_config, make_trainer

    trial = Trial.from_dict(config["trial"])
    job = job_config(BaseCache(settings.cache_uri), trial.base, adapter=trial.adapter_settings(settings.adapter),
                     training=trial.training_settings(settings.training), task=settings.task,
                     threads_per_worker=settings.cpus_per_worker,
                     resume_from=latest_checkpoint(settings.run_dir, trial.id))
    resources = Resources(settings.workers, settings.cpus_per_worker, settings.gpus_per_worker)
    trainer = make_trainer(job, resources, train_dir(settings.run_dir, trial.id), _fresh_name(),
                           max_failures=WORKER_RESTARTS, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:  # let Tune see the failure (and retry the trial)
        raise result.error


def _fresh_name() -> str:
    """A name no earlier session or attempt used: sortable by time, unique across hosts."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


# what Tune adds to every result and nobody reads back (time_total_s is kept: the leaderboard's seconds)
TUNE_BOOKKEEPING = frozenset({"timestamp", "checkpoint_dir_name", "done", "trial_id", "date", "pid", "hostname",
                              "time_this_iter_s", "time_since_restore", "iterations_since_restore", "config"})


class TrialRecorder(tune.Callback):
    """Writes loftune's record of each trial (trial_records.py) from the driver, as Tune reports."""

    def __init__(self, run_dir: str, session: str, max_steps: dict[str, int]):
        self.run_dir, self.session, self.max_steps = run_dir, session, max_steps
        self._last_step: dict[str, int] = {}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        write_status(self.run_dir, trial.config["trial"], RUNNING)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        trial_id = trial.config["trial"]["id"]
        report = {k: v for k, v in result.items() if k not in TUNE_BOOKKEEPING}
        append_report(self.run_dir, trial_id, {**report, "session": self.session})
        if "max_steps" in result:
            self.max_steps[trial_id] = result["max_steps"]
        self._last_step[trial_id] = max(self._last_step.get(trial_id, 0), result.get("step", 0))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        trial_id = trial.config["trial"]["id"]
        done = self._last_step.get(trial_id, 0) >= self.max_steps.get(trial_id, 0)
        write_status(self.run_dir, trial.config["trial"], DONE if done else STOPPED_EARLY)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        write_status(self.run_dir, trial.config["trial"], FAILED, error=_error_text(trial))


def _error_text(trial) -> str | None:
    """The end of the trial's error.txt (text Tune wrote in this session's private folder)."""
    try:
        with open(trial.error_file, errors="replace") as f:
            return f.read()[-2000:]
    except (OSError, TypeError):
        return None


def run_task(plan: Plan, task: TaskSpec, run_dir: str, cache_uri: str, concurrency: int) -> bool:
    """Run (or resume) the sweep of one task; returns True when earlier sessions had recorded trials of it."""
    spec = plan.spec
    run_dir = os.path.abspath(run_dir)
    earlier = {s.trial["id"]: s for s in read_states(run_dir) if s.trial.get("task") == task.name}
    trials = [t for t in plan.trials_for(task.name) if t.id not in earlier or earlier[t.id].status not in FINISHED]
    if not trials:
        return bool(earlier)
    for key, value in TUNE_ENV.items():  # setdefault: a user's own setting wins
        os.environ.setdefault(key, value)
    settings = TrialSettings(cache_uri=cache_uri, run_dir=run_dir, task=task, training=spec.training,
                             adapter=spec.adapter, workers=spec.resources.workers_per_trial,
                             cpus_per_worker=spec.resources.cpus_per_worker,
                             gpus_per_worker=spec.resources.gpus_per_worker)
    # the trial driver's own request; its Ray Train workers ask for theirs
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": TRIAL_DRIVER_CPUS})
    max_steps = {t.id: plan.training_for(t).max_steps for t in plan.trials_for(task.name)}
    session = _fresh_name()
    progress = TrialProgress(task.name, max_steps, metric_for(spec.sweep, task.type)[0],
                             earlier={k: (s.status, s.reports) for k, s in earlier.items()})
    private = tempfile.mkdtemp(prefix="loftune-tune-")
    try:
        tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.to_dict() for t in trials])},
            tune_config=tune.TuneConfig(scheduler=_scheduler(plan, task), max_concurrent_trials=concurrency,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=session, storage_path=private, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                      callbacks=[TrialRecorder(run_dir, session, dict(max_steps)), progress]),
        ).fit()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return bool(earlier)


def _trial_name(trial) -> str:
    return trial.config["trial"]["id"]


def _scheduler(plan: Plan, task: TaskSpec):
    sweep, training = plan.spec.sweep, plan.spec.training
    if sweep.scheduler != "asha":
        return None
    metric, mode = metric_for(sweep, task.type)
    max_t = max(plan.training_for(t).max_steps for t in plan.trials_for(task.name))
    return tune.schedulers.ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=max_t,
                                         grace_period=min(sweep.grace_period or training.eval_every, max_t),
                                         reduction_factor=sweep.reduction_factor)
