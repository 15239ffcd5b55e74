"""One job, start to finish: the recipe behind `loftune run`, read top to bottom.

    spec -> plan (trials, distinct bases) -> run directory (resolved spec; resume if it is there)
         -> Ray (embedded, or the cluster at --address) -> check the cluster fits a trial
         -> build each missing base once (Ray actors) -> sweep each task (Ray Tune + Train + DeepSpeed)
         -> leaderboard.csv, results.json, plots, the best trial's export per task
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

from orchestrator.best import export_best
from orchestrator.build import connect, describe_entry, ensure_base
from orchestrator.cache import BaseCache, CacheError
from orchestrator.plan import Plan, cluster_problems, local_cluster, make_plan, max_concurrent, sweep_points
from orchestrator.plots import write_plots
from orchestrator.results import best_records, leaderboard, read_trials, write_leaderboard
from orchestrator.run_dir import FAILED, UNFINISHED, check_run_dir, claim_run_dir
from orchestrator.spec import JobSpec, SpecError
from orchestrator.sweep import run_task


@dataclass
class RunSummary:
    run_dir: str
    resumed: bool
    built: list[str] = field(default_factory=list)  # bases built by this run
    factors: list[str] = field(default_factory=list)  # "<base> r<rank>": LoftQ factors added to a shared base
    cached: list[str] = field(default_factory=list)  # bases found in the cache
    rows: list[dict] = field(default_factory=list)  # the leaderboard
    best: dict[str, str] = field(default_factory=dict)  # task -> export folder
    plots: list[str] = field(default_factory=list)
    planned: int = 0  # trials in the spec; Tune creates them as they start, so an interrupted run may have fewer

    @property
    def not_started(self) -> int:
        return max(0, self.planned - len(self.rows))

    @property
    def failed(self) -> list[str]:
        return [r["trial"] for r in self.rows if r["status"] == FAILED or r["status"] in UNFINISHED]

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "resumed": self.resumed, "built": self.built, "factors": self.factors,
                "cached": self.cached,
                "failed": self.failed, "planned": self.planned, "not_started": self.not_started, "best": self.best,
                "plots": self.plots, "leaderboard": self.rows}


def work_dir(cache: BaseCache) -> str:
    """Where built-in tiny models are materialized: beside a local cache, else in ~/.cache/loftune."""
    return cache.root if cache.is_local else os.path.expanduser("~/.cache/loftune")


def check_task_data(spec: JobSpec, plan: Plan) -> dict[str, int]:
    """Load every task once with the model's tokenizer, so a missing column or a bad label fails now, named,
    and not inside a trial minutes later (SpecError listing every task's problem).

    Returns each task's number of training examples (what `epochs` count in)."""
    import transformers

    from workers.tasks import TaskError, load_task

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(plan.source.path)
    except (OSError, ValueError) as exc:
        raise SpecError([f"model: no tokenizer in {plan.source.path} ({exc})"]) from None
    problems, sizes = [], {}
    for i, task in enumerate(spec.tasks):
        try:
            sizes[task.name] = len(load_task(task, tokenizer).train)
        except TaskError as exc:
            problems += [f"tasks[{i}].{line}" for line in str(exc).splitlines()]
    if problems:
        raise SpecError(problems)
    return sizes


def check_cluster(spec: JobSpec, address: str | None) -> dict[str, float]:
    """The resources trials will run on, checked to fit one trial (SpecError otherwise, before any work): the
    Ray cluster's at `address` (joined), else this machine's (the embedded Ray is not started here)."""
    if address:
        import ray

        connect(address)
        cluster, where = ray.cluster_resources(), f"the Ray cluster at {address}"
    else:
        cluster, where = local_cluster(spec), "this machine"
    problems = cluster_problems(spec, cluster, where)
    if problems:
        raise SpecError(problems)
    return cluster


def prepare(spec: JobSpec, address: str | None) -> Plan:
    """What `validate`, `run --dry-run` and `run` check and work out before any work: the plan (trials and their
    bases, checked against the model), every task's data loaded once (its size: what `epochs` count in) and the
    cluster checked to fit a trial (`check_cluster`). Every problem is a SpecError."""
    plan = make_plan(spec, work_dir(open_cache(spec)))
    plan.train_sizes = check_task_data(spec, plan)
    plan.cluster = check_cluster(spec, address)
    return plan


def build_bases(plan: Plan, cache: BaseCache, address: str | None, summary: RunSummary) -> None:
    """Each distinct base (and each rank's LoftQ factors) built once, before any trial that needs it. Every entry
    a run uses is checked first (sizes, and sha256 once per run): a broken one is rebuilt, identically."""
    actors = plan.spec.resources.build_actors
    verified: set[str] = set()
    for request in plan.builds:
        name = request.key().name
        before = describe_entry(request, cache)
        result = ensure_base(request, cache, actors=actors, address=address, verify_hashes=name not in verified)
        verified.add(name)
        if result.repaired:
            what = f"broken ({result.repaired[0]}), rebuilt"
            summary.built.append(name)
        elif not result.built:
            what = "cached"
            if name not in summary.cached:
                summary.cached.append(name)
        elif before.startswith("factors"):
            what = f"LoftQ factors for rank {request.rank} added"
            summary.factors.append(f"{name} r{request.rank}")
        else:
            what = "built"
            summary.built.append(name)
        print(f"base {name}: {what} in {result.seconds:.1f} s", file=sys.stderr)


def base_status(plan: Plan, cache: BaseCache) -> dict[str, str]:
    """For a dry run: what each build would do (sizes are checked, not hashes)."""
    status: dict[str, str] = {}
    for request in plan.builds:
        name, what = request.key().name, describe_entry(request, cache)
        if what.startswith("factors"):
            status[name] = status.get(name, "cached") + f", {what}"
        else:
            status.setdefault(name, what)
    return status


def open_cache(spec: JobSpec) -> BaseCache:
    """The spec's cache; a location that cannot be a cache is a spec problem (exit 2), not a traceback."""
    try:
        return BaseCache(spec.cache.uri)
    except ValueError as exc:
        raise SpecError([f"cache.uri: {exc}"]) from None


def collect_results(run_dir: str, spec: JobSpec, cache: BaseCache | None, export: bool) -> RunSummary:
    """Leaderboard, results.json and plots from the run directory (and the best exports when `export`)."""
    summary = RunSummary(run_dir=run_dir, resumed=False)
    records = read_trials(run_dir, spec)
    summary.rows = leaderboard(records, spec)
    summary.planned = len(sweep_points(spec)) * len(spec.tasks)
    write_leaderboard(run_dir, summary.rows)
    manifests = {}
    if cache is not None:
        for base in dict.fromkeys(r.trial.base for r in records):
            try:
                manifests[base] = cache.show(base)
            except CacheError:  # the entry was removed since: the error plot just leaves it out
                continue
    summary.plots = write_plots(run_dir, spec, records, manifests)
    if export and cache is not None:
        for task, record in best_records(records, spec).items():
            summary.best[task] = export_best(run_dir, spec, record, cache)
    return summary


def execute(spec: JobSpec, run_dir: str, address: str | None = None) -> RunSummary:
    """Run (or resume) the whole job; returns what it did and the leaderboard."""
    check_run_dir(run_dir)  # before any work: a folder of the user's never becomes a run directory
    plan = prepare(spec, address)
    cache = open_cache(spec)
    if not address:  # the embedded Ray, with the slivers of CPU the trials' drivers ask for
        connect(None, num_cpus=math.ceil(plan.cluster["CPU"]))
    resumed = claim_run_dir(run_dir, spec)
    summary = RunSummary(run_dir=run_dir, resumed=resumed)
    build_bases(plan, cache, address, summary)
    concurrency = max_concurrent(spec, plan.cluster)
    for task in spec.tasks:
        summary.resumed |= run_task(plan, task, run_dir, cache.uri, concurrency)
        if any(r.status in UNFINISHED for r in read_trials(run_dir, spec) if r.trial.task == task.name):
            # Tune catches Ctrl-C, saves its state (trials still running) and returns: the run stops here, not
            # at the next task (a sweep that ends on its own leaves every trial done or failed)
            raise KeyboardInterrupt
    final = collect_results(run_dir, spec, cache, export=True)
    summary.rows, summary.best, summary.plots, summary.planned = final.rows, final.best, final.plots, final.planned
    return summary
