"""YAML job specs: typed sections that map one-to-one onto YAML keys, validated all at once.

    name, model, quantization, cache, tasks, training, adapter, sweep, resources

`load_spec(path, overrides)` parses the file (a syntax error names its line), applies `--set key=value`
overrides, checks every section and every cross-field rule, and raises one `SpecError` listing every
problem with its dotted path (`sweep.bits[2]: expected one of [2, 3, 4], got 8`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from workers.matrix_worker import METHODS
from workers.quant import ALLOWED_BITS, SCALE_DTYPES
from workers.train_settings import AdapterSettings, TrainSettings

SWEEP_MODES = ("grid", "random")
SCHEDULERS = ("fifo", "asha")
SWEEPABLE = ("bits", "rank", "group_size", "lr")


class SpecError(ValueError):
    """Every problem found in a job spec, one per line, each naming its dotted path."""

    def __init__(self, problems: list[str], source: str = "spec"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


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
    mode: str = "grid"
    bits: list[int] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    group_size: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    num_samples: int = 1
    scheduler: str = "fifo"
    metric: str = "eval_accuracy"
    metric_mode: str = "max"
    max_concurrent_trials: int | None = None
    seed: int = 0

    def problems(self, path: str, kind: str) -> list[str]:
        out = []
        if self.mode not in SWEEP_MODES:
            out.append(f"{path}.mode: expected one of {list(SWEEP_MODES)}, got {self.mode!r}")
        if self.scheduler not in SCHEDULERS:
            out.append(f"{path}.scheduler: expected one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if self.metric_mode not in ("max", "min"):
            out.append(f"{path}.metric_mode: expected 'max' or 'min', got {self.metric_mode!r}")
        if self.num_samples < 1:
            out.append(f"{path}.num_samples: expected an integer >= 1, got {self.num_samples}")
        for i, bits in enumerate(self.bits):
            if kind in ALLOWED_BITS and bits not in ALLOWED_BITS[kind]:
                out.append(f"{path}.bits[{i}]: {kind} supports {list(ALLOWED_BITS[kind])}, got {bits!r}")
        for name in ("rank", "group_size"):
            for i, value in enumerate(getattr(self, name)):
                if value < 1:
                    out.append(f"{path}.{name}[{i}]: expected an integer >= 1, got {value}")
        for i, value in enumerate(self.lr):
            if not value > 0:
                out.append(f"{path}.lr[{i}]: expected a learning rate > 0, got {value}")
        return out


@dataclass(frozen=True)
class Resources:
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    build_actors: int | None = None
    max_concurrent_trials: int | None = None

    def problems(self, path: str = "resources") -> list[str]:
        out = []
        for name in ("workers_per_trial", "cpus_per_worker"):
            if getattr(self, name) < 1:
                out.append(f"{path}.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            out.append(f"{path}.gpus_per_worker: expected an integer >= 0, got {self.gpus_per_worker}")
        return out


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
    """`--set a.b=value` (value parsed as YAML, so `[2,4]`, `1e-4`, `true` work) into the raw mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. training.lr=1e-4")
            continue
        value = yaml.safe_load(raw) if raw else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                problems.append(f"--set {key}: {part} is not a mapping")
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
    return data


def build_spec(data: dict, problems: list[str]) -> JobSpec | None:
    """Typed sections from the raw mapping; every problem appended to `problems`."""
    from workers.tasks import TaskSpec

    for key in data:
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown key; valid keys: {list(TOP_KEYS)}")
    for key in ("name", "model"):
        if not isinstance(data.get(key), str) or not data.get(key):
            problems.append(f"{key}: expected a non-empty string, got {_type(data.get(key))}")
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
    if problems:
        return None
    return JobSpec(name=data["name"], model=data["model"], tasks=tasks, **sections)


def load_spec(path: str, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file; raises SpecError (with every problem) or returns it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise SpecError([f"cannot read the spec file: {exc.strerror}"], path) from None
    data = parse_yaml(text, path)
    problems: list[str] = []
    apply_overrides(data, overrides or [], problems)
    spec = build_spec(data, problems)
    if problems:
        raise SpecError(problems, path)
    return spec
