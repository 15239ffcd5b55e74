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

import yaml

from orchestrator.best import export_best
from orchestrator.build import describe_entry, ensure_base
from orchestrator.cache import BaseCache, CacheError
from orchestrator.plan import Plan, cluster_problems, local_cluster, make_plan, max_concurrent, sweep_points
from orchestrator.plots import write_plots
from orchestrator.results import UNFINISHED, best_records, leaderboard, read_trials, write_leaderboard
from orchestrator.spec import JobSpec, SpecError, build_spec, read_spec_file, spec_to_dict
from orchestrator.sweep import run_task

SPEC_FILE = "spec.yaml"


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
        return [r["trial"] for r in self.rows if r["status"] == "failed" or r["status"] in UNFINISHED]

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "resumed": self.resumed, "built": self.built, "factors": self.factors,
                "cached": self.cached,
                "failed": self.failed, "planned": self.planned, "not_started": self.not_started, "best": self.best,
                "plots": self.plots, "leaderboard": self.rows}


def default_run_dir(spec: JobSpec) -> str:
    """`$LOFTUNE_RUNS/<name>`, else `runs/<name>`: no timestamp, so running a spec again resumes it."""
    return os.path.join(os.environ.get("LOFTUNE_RUNS", "runs"), spec.name)


def work_dir(cache: BaseCache) -> str:
    """Where built-in tiny models are materialized: beside a local cache, else in ~/.cache/loftune."""
    return cache.root if cache.is_local else os.path.expanduser("~/.cache/loftune")


def claim_run_dir(run_dir: str, spec: JobSpec) -> bool:
    """Write the resolved spec into the run directory; True if the directory already holds this same spec.

    A directory holding a different spec is refused (SpecError naming the fields that differ): resuming
    with other settings would mix two experiments in one leaderboard. The earlier spec is resolved again
    first, so a field that a newer loftune added (with its default) does not count as a difference.
    """
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


def check_run_dir(run_dir: str) -> None:
    """A run directory is new, empty, or one loftune made (it holds spec.yaml): loftune writes and deletes
    inside it (`best/<task>` is replaced on every run), so a folder of the user's must never become one."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise SpecError([f"--out: {run_dir} exists and is not a directory"], "run directory")
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not os.path.isfile(os.path.join(run_dir, SPEC_FILE)):
        raise SpecError([f"--out: {run_dir} is not empty and is not a loftune run directory (no {SPEC_FILE}); "
                         f"choose a new or empty directory"], "run directory")


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
    path = os.path.join(run_dir, SPEC_FILE)
    if not os.path.exists(path):
        raise SpecError([f"{run_dir} is not a loftune run directory (no {SPEC_FILE})"], "results")
    data = read_spec_file(path, path)
    problems: list[str] = []
    spec = build_spec(data, problems)
    if problems:
        raise SpecError(problems, path)
    return spec


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


def connect_cluster(spec: JobSpec, address: str | None) -> dict[str, float]:
    """Join the cluster at `address` or start the embedded Ray; returns its resources after checking that one
    trial fits (SpecError otherwise, before any work)."""
    import ray

    from orchestrator.build import connect

    if address:
        connect(address)
        cluster, where = ray.cluster_resources(), f"the Ray cluster at {address}"
    else:
        cluster, where = local_cluster(spec), "this machine"
    problems = cluster_problems(spec, cluster, where)
    if problems:
        raise SpecError(problems)
    if not address:
        connect(None, num_cpus=math.ceil(cluster["CPU"]))
    return cluster


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
    cache = open_cache(spec)
    plan = make_plan(spec, work_dir(cache))
    plan.train_sizes = check_task_data(spec, plan)
    cluster = connect_cluster(spec, address)
    resumed = claim_run_dir(run_dir, spec)
    summary = RunSummary(run_dir=run_dir, resumed=resumed)
    build_bases(plan, cache, address, summary)
    concurrency = max_concurrent(spec, cluster)
    for task in spec.tasks:
        summary.resumed |= run_task(plan, task, run_dir, cache.uri, concurrency)
        if any(r.status in UNFINISHED for r in read_trials(run_dir, spec) if r.trial.task == task.name):
            # Tune catches Ctrl-C, saves its state (trials still running) and returns: the run stops here, not
            # at the next task (a sweep that ends on its own leaves every trial done or failed)
            raise KeyboardInterrupt
    final = collect_results(run_dir, spec, cache, export=True)
    summary.rows, summary.best, summary.plots, summary.planned = final.rows, final.best, final.plots, final.planned
    return summary
