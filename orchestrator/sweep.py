"""Run a plan's trials under Ray Tune: one Tune experiment per task, one Ray Train job per trial.

    plan.trials_for(task) -> Tuner(grid over the planned trials) -> run_trial (a Tune function trainable)
        -> TorchTrainer (DeepSpeed workers, workers/train_loop.py) -> TuneReportCallback -> Tune results

Tune searches nothing itself: the planner already expanded the search space (so the bases are known and
built before any trial starts), and Tune runs exactly those trials, `max_concurrent_trials` at a time, with
ASHA early stopping when asked. Names carry no timestamp, so running a spec again finds its experiment:
`Tuner.restore` skips finished trials and resumes the others, whose Train runs (named by trial id) pick up
their latest checkpoint. Failures are retried at both levels: a worker group restarts inside its Train run,
and a trial that still fails is retried by Tune.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ray import tune

from orchestrator.plan import TRIAL_DRIVER_CPUS, Plan, Trial
from orchestrator.progress import TrialProgress
from orchestrator.spec import metric_for
from workers.tasks import TaskSpec
from workers.train_settings import AdapterSettings, TrainSettings

TUNE_DIR = "tune"  # <run_dir>/tune/<task>/<trial id>/: Tune's params.json, result.json, progress.csv
TRAIN_DIR = "train"  # <run_dir>/train/<trial id>/checkpoint_*: the trial's Ray Train run and checkpoints
TRIAL_RETRIES = 2  # Tune-level retries of a trial whose Train run failed for good
WORKER_RESTARTS = 2  # Train-level restarts of a trial's worker group from its latest checkpoint

# Each report carries only the metrics of that moment (evaluation is every M steps), so Tune must accept
# results that lack the sweep metric; ASHA skips them.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
logging.getLogger("ray.tune").setLevel(logging.WARNING)  # our progress table says what its INFO lines say


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of one task needs besides its own point (sent once, through the object store)."""

    cache_uri: str
    run_dir: str
    task: TaskSpec
    training: TrainSettings
    adapter: AdapterSettings
    workers: int
    cpus_per_worker: int
    gpus_per_worker: int


def run_trial(config: dict, settings: TrialSettings) -> None:
    """Tune function trainable: fine-tune one trial as a Ray Train job; its reports become Tune results."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.cache import BaseCache
    from orchestrator.finetune import Resources, job_config, make_trainer

    trial = Trial.from_dict(config["trial"])
    job = job_config(BaseCache(settings.cache_uri), trial.base, adapter=trial.adapter_settings(settings.adapter),
                     training=trial.training_settings(settings.training), task=settings.task,
                     threads_per_worker=settings.cpus_per_worker)
    resources = Resources(settings.workers, settings.cpus_per_worker, settings.gpus_per_worker)
    trainer = make_trainer(job, resources, os.path.join(settings.run_dir, TRAIN_DIR), trial.id,
                           max_failures=WORKER_RESTARTS, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:  # let Tune see the failure (and retry the trial)
        raise result.error


def _trial_name(trial) -> str:
    return trial.config["trial"]["id"]


def tune_path(run_dir: str, task: str) -> str:
    return os.path.join(os.path.abspath(run_dir), TUNE_DIR, task)


def run_task(plan: Plan, task: TaskSpec, run_dir: str, cache_uri: str, concurrency: int) -> bool:
    """Run (or resume) the sweep of one task; returns True when it resumed an earlier experiment."""
    spec = plan.spec
    trials = plan.trials_for(task.name)
    settings = TrialSettings(cache_uri=cache_uri, run_dir=os.path.abspath(run_dir), task=task,
                             training=spec.training, adapter=spec.adapter, workers=spec.resources.workers_per_trial,
                             cpus_per_worker=spec.resources.cpus_per_worker,
                             gpus_per_worker=spec.resources.gpus_per_worker)
    # the trial driver's own request; its Ray Train workers ask for theirs
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": TRIAL_DRIVER_CPUS})
    path = tune_path(run_dir, task.name)
    max_steps = {t.id: plan.training_for(t).max_steps for t in trials}
    callback = TrialProgress(task.name, max_steps, metric_for(spec.sweep, task.type)[0])
    resumed = tune.Tuner.can_restore(path)
    if resumed:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.to_dict() for t in trials])},
            tune_config=tune.TuneConfig(scheduler=_scheduler(plan, task), max_concurrent_trials=concurrency,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=task.name, storage_path=os.path.dirname(path), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
                                      callbacks=[callback]),
        )
    tuner.fit()  # a restored Tuner brings its own copy of the callback back from the experiment state
    return resumed


def _scheduler(plan: Plan, task: TaskSpec):
    sweep, training = plan.spec.sweep, plan.spec.training
    if sweep.scheduler != "asha":
        return None
    metric, mode = metric_for(sweep, task.type)
    max_t = max(plan.training_for(t).max_steps for t in plan.trials_for(task.name))
    return tune.schedulers.ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=max_t,
                                         grace_period=min(sweep.grace_period or training.eval_every, max_t),
                                         reduction_factor=sweep.reduction_factor)
