"""Plan a job: expand the sweep into trials and work out the distinct quantized bases they need.

    spec -> sweep points (grid product or seeded random draws) x tasks -> trials
         -> one BuildRequest per trial -> distinct cache entries, and the builds that make them

A base depends on bits and group size, and on the rank only when LoftQ alternates (iters > 1): with
iters <= 1 all ranks share one entry, and each rank adds only its LoftQ factors. Bits 16 is the full-precision
control (plain LoRA over the bf16 base): one entry for every rank, and one trial per (task, rank, lr, ...) point
however many group sizes the sweep has (its trial id says `bf16`, its group size is None). Checks that need the
model (a group size that does not divide a target layer, a rank larger than a layer allows) or the cluster
(more workers than it has) are made here, before any work, and name the spec field that caused them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field, replace

from orchestrator.build_request import BuildRequest
from orchestrator.errors import Problem
from orchestrator.spec import Adapter, Calibration, JobSpec, Quantization, SpecError
from workers.calibration import CalibrationData, CalibrationError, CalibrationSource, read_calibration
from workers.entry_format import CALIBRATED_METHODS, FULL_PRECISION_BITS, FULL_PRECISION_METHOD, adapter_for
from workers.model_source import ModelSource, open_model
from workers.quant import QuantSpec
from workers.quant_plan import Override, QuantPlan, max_rank
from workers.train_settings import AdapterSettings, TrainSettings, with_epoch_steps

# Ray Tune runs each trial's driver in an actor of its own. It only waits on its Ray Train workers, so it asks
# for a sliver of a CPU (0 is refused): a whole CPU per driver could leave the workers none after a node is lost
# (the drivers hold what is left, and Ray Train waits for workers forever).
TRIAL_DRIVER_CPUS = 0.01


@dataclass(frozen=True)
class Trial:
    """One fine-tuning run of the sweep: a point of the search space on one task, and the base it trains on."""

    id: str  # readable and unique, e.g. "sentiment-nf2-g64-r8-lr0.001" (or "sentiment-bf16-r8-lr0.001" at bits 16)
    task: str
    bits: int  # 16: the full-precision control, plain LoRA over the bf16 base
    group_size: int | None  # None at bits 16: no quantization groups
    rank: int
    lr: float
    seed: int  # training seed (grid repeats and random draws get their own)
    training: dict  # other swept training fields, e.g. {"warmup_steps": 10}
    base: str  # the cache entry it trains on
    method: str | None = None  # how the base was made (entry_format.METHODS, or lora); None in older run records

    def to_dict(self) -> dict:
        return asdict(self)

    def training_settings(self, base: TrainSettings) -> TrainSettings:
        """The spec's training settings with this trial's learning rate, seed and swept fields, and the length of
        training resolved as far as it can be without the data (`with_epoch_steps`)."""
        return with_epoch_steps(replace(base, lr=self.lr, seed=self.seed, **self.training))

    def adapter_settings(self, base: Adapter) -> AdapterSettings:
        """The spec's adapter settings at this trial's rank; the full-precision control starts as plain LoRA (A
        random, B = 0: init 'qlora'), since its base stores no LoftQ factors."""
        init = "qlora" if self.bits == FULL_PRECISION_BITS or self.method == "qlora" else base.init
        return base.at_rank(self.rank, init)

    @classmethod
    def from_dict(cls, data: dict) -> Trial:
        return cls(**data)


@dataclass
class Plan:
    spec: JobSpec
    source: ModelSource
    trials: list[Trial]
    builds: list[BuildRequest]  # one per distinct (entry, LoftQ factor rank), in the order trials need them
    train_sizes: dict[str, int] = field(default_factory=dict)  # task -> training examples, once data is checked
    cluster: dict[str, float] = field(default_factory=dict)  # the resources trials run on, once checked to fit one

    @property
    def bases(self) -> list[str]:
        """The distinct cache entries the trials train on."""
        return list(dict.fromkeys(t.base for t in self.trials))

    def trials_for(self, task: str) -> list[Trial]:
        return [t for t in self.trials if t.task == task]

    def training_for(self, trial: Trial) -> TrainSettings:
        """The trial's training settings, with max_steps derived from `epochs` once the task's size is known
        (the same derivation each Train worker makes from the data it loads)."""
        settings = trial.training_settings(self.spec.training)
        return with_epoch_steps(settings, self.train_sizes.get(trial.task), self.spec.resources.workers_per_trial)


# ---------------------------------------------------------------------------------------------- the sweep


def sweep_points(spec: JobSpec) -> list[dict]:
    """Every point of the search space: {bits, group_size, rank, lr, seed, training: {...}}, plus `where`,
    the spec path each swept value came from (for error messages)."""
    sweep, q, training = spec.sweep, spec.quantization, spec.training
    base = {"bits": q.bits, "method": q.method, "group_size": q.group_size, "rank": q.rank, "lr": training.lr}
    axes = sweep.axes()
    points = []
    if sweep.mode == "grid":
        names = list(axes)
        for k in range(sweep.num_samples):
            for combo in itertools.product(*(list(enumerate(axes[n])) for n in names)):
                values = {n: v for n, (_, v) in zip(names, combo, strict=True)}
                where = {n: f"sweep.{n}[{i}]" for n, (i, _) in zip(names, combo, strict=True)}
                points.append(_point(base, values, where, training.seed + k))
    else:
        rng = random.Random(sweep.seed)
        for k in range(sweep.num_samples):
            picks = {n: rng.randrange(len(v)) for n, v in axes.items()}
            values = {n: axes[n][i] for n, i in picks.items()}
            where = {n: f"sweep.{n}[{i}]" for n, i in picks.items()}
            if sweep.lr_range:
                low, high = (math.log(x) for x in sweep.lr_range)
                values["lr"] = float(f"{math.exp(rng.uniform(low, high)):.3g}")
                where["lr"] = "sweep.lr_range"
            points.append(_point(base, values, where, training.seed + k))
    return _full_precision_once(points)


def _full_precision_once(points: list[dict]) -> list[dict]:
    """Bits-16 points lose their group size, and each is kept once: the control has no quantization groups, so
    a grid over group sizes would otherwise repeat it."""
    out, seen = [], set()
    for point in points:
        if point["bits"] == FULL_PRECISION_BITS:
            where = {k: v for k, v in point["where"].items() if k not in ("group_size", "method")}
            point = {**point, "group_size": None, "method": FULL_PRECISION_METHOD, "where": where}
            same = json.dumps({k: v for k, v in point.items() if k != "where"}, sort_keys=True, default=str)
            if same in seen:
                continue
            seen.add(same)
        out.append(point)
    return out


def _point(base: dict, values: dict, where: dict, seed: int) -> dict:
    point = {**base, "seed": seed, "training": {}, "where": where}
    for name, value in values.items():
        if name.startswith("training."):
            point["training"][name.removeprefix("training.")] = value
        else:
            point[name] = value
    return point


def trial_id(task: str, point: dict, quant_label: str, repeated: bool) -> str:
    """Readable and unique, and one plain path component (it names the trial's folders): at most MAX_ID long."""
    extra = "".join(f"-{_short(k)}{v}" for k, v in sorted(point["training"].items()))
    seed = f"-s{point['seed']}" if repeated else ""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", f"{task}-{quant_label}-r{point['rank']}-lr{point['lr']:g}{extra}{seed}")
    if len(text) > MAX_ID:  # long task names or many swept fields: keep the start readable, the end unique
        text = f"{text[:MAX_ID - 13]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return text


MAX_ID = 160


def _short(field: str) -> str:
    """'warmup_steps' -> 'ws': keeps trial ids readable when training fields are swept."""
    return "".join(part[0] for part in field.split("_"))


# --------------------------------------------------------------------------------------------- planning


def quant_plan(q: Quantization, bits: int, group_size: int) -> QuantPlan:
    """The QuantPlan of one sweep point (the spec's mixed-precision plan and overrides kept)."""
    spec = QuantSpec(q.kind, bits, group_size, q.scale_dtype)
    overrides = tuple(Override(o.pattern, o.bits, o.group_size) for o in q.overrides)
    mixed = q.mixed
    return QuantPlan(spec, first_layers=mixed.first_layers if mixed else 0, first_bits=mixed.bits if mixed else None,
                     overrides=overrides)


def build_request(q: Quantization, source: ModelSource, point: dict,
                  calibration: CalibrationData | None = None) -> BuildRequest:
    """The base one sweep point trains on: a quantized one, or the bf16 base of the full-precision control.
    `calibration` weights a calibrated method's (cloq's) low-rank step and scores the other quantized bases
    (their output errors in the manifest); the full-precision control has no error to score."""
    if point["bits"] == FULL_PRECISION_BITS:
        return BuildRequest.full_precision(source, rank=point["rank"], targets=tuple(q.targets))
    return BuildRequest(source, quant_plan(q, point["bits"], point["group_size"]), method=point["method"],
                        rank=point["rank"], iters=q.iters, targets=tuple(q.targets), calibration=calibration)


def file_calibration_source(c: Calibration) -> CalibrationSource:
    """The source a `calibration:` section with a file names (the spec's, or loftune quantize's flags)."""
    return CalibrationSource(c.file, (c.column or "text",), c.samples, c.max_length, damping=c.damping)


def calibration_source(spec: JobSpec) -> CalibrationSource:
    """Where a calibrated method's texts come from: `quantization.calibration.file`, else the first task's
    training rows (its evaluation rows held out: the split `load_task` makes)."""
    c = spec.quantization.calibration or Calibration()
    if c.file is not None:
        return file_calibration_source(c)
    task = spec.tasks[0].resolved()
    if task.type == "prompt_answer":
        columns = (task.prompt_column, task.answer_column)
    else:
        columns = tuple(column for column in (task.text_column, task.text_pair_column) if column)
    holdout = None if task.eval_file else (task.eval_fraction, task.seed)
    return CalibrationSource(task.train_file, columns, c.samples, c.max_length, task.csv_encoding, holdout,
                             c.damping)


def read_spec_calibration(spec: JobSpec) -> CalibrationData:
    """The calibration data of a spec; a SpecError naming the calibration field (or the task) it came from."""
    try:
        return read_calibration(calibration_source(spec))
    except CalibrationError as exc:
        given = spec.quantization.calibration is not None and spec.quantization.calibration.file is not None
        path = f"quantization.{exc.field}" if given else "tasks[0].train_file"
        message = exc.message if given else f"calibration data for cloq: {exc.message}"
        raise SpecError([Problem(path, message)]) from None


def make_plan(spec: JobSpec, work_dir: str) -> Plan:
    """Expand the sweep into trials and their bases; raises SpecError listing every problem at once."""
    try:
        source = open_model(spec.model, work_dir)
        targets = source.select_targets(spec.quantization.targets)
    except (FileNotFoundError, ValueError) as exc:
        raise SpecError([str(exc) if str(exc).startswith("model") else Problem("model", str(exc))]) from None
    if not targets:
        raise SpecError([Problem("quantization.targets",
                                 f"{spec.quantization.targets} match no linear layer of {source.name}")])
    shapes = {m: tuple(source.tensors[m + ".weight"].shape) for m in targets}
    q = spec.quantization
    points = sweep_points(spec)
    problems: list[Problem] = []
    for point in points:
        problems += _point_problems(q, point, shapes)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))
    repeated = spec.sweep.mode == "random" or spec.sweep.num_samples > 1
    # calibration data is read for a calibrated method, or when the spec names it (then it scores every base)
    quantized = [p for p in points if p["bits"] != FULL_PRECISION_BITS]
    calibrated = any(p["method"] in CALIBRATED_METHODS for p in quantized)
    wanted = calibrated or (q.calibration is not None and bool(quantized))
    calibration = read_spec_calibration(spec) if wanted else None
    trials, builds = [], {}
    for task in spec.tasks:
        for point in points:
            request = build_request(q, source, point, calibration)
            name = request.key().name
            builds.setdefault((name, point["rank"] if request.stores_factors else None), request)
            label = request.label
            if spec.sweep.method and not request.is_full_precision:  # the id says which method (when swept)
                label = f"{label}-{point['method']}"
            trials.append(Trial(id=trial_id(task.name, point, label, repeated), task=task.name,
                                bits=point["bits"], group_size=point["group_size"], rank=point["rank"],
                                lr=point["lr"], seed=point["seed"], training=point["training"], base=name,
                                method=point["method"]))
    _check_unique([t.id for t in trials])
    return Plan(spec, source, trials, list(builds.values()))


def _point_problems(q: Quantization, point: dict, shapes: dict[str, tuple]) -> list[Problem]:
    """Group sizes that do not divide a layer, ranks a layer cannot hold: each named by the field it came from."""
    where = point["where"]
    out = []
    qp = None if point["bits"] == FULL_PRECISION_BITS else quant_plan(q, point["bits"], point["group_size"])
    for problem in qp.problems(shapes) if qp else []:
        field = where.get("group_size", "quantization.group_size")
        out.append(Problem(field, problem))
    if out:
        return out[:3]  # the first few layers say it; every other layer of the model would repeat it
    rank_field = where.get("rank", "quantization.rank")
    pooled = adapter_for(point["method"]) == "qalora" and qp is not None  # QA-LoRA's A has in / group_size columns
    for module, shape in shapes.items():
        group_size = qp.spec_for(module).group_size if qp else None
        if point["rank"] > max_rank(shape, group_size, pooled):
            what = f"in_features / group_size = {shape[1] // group_size}" if pooled else f"shape {shape}"
            out.append(Problem(rank_field, f"rank {point['rank']} exceeds what {module} can hold ({what})"))
            break
    return out


def _check_unique(ids: list[str]) -> None:
    seen = {i for i in ids if ids.count(i) > 1}
    if seen:  # only two identical sweep values can do this (e.g. sweep.rank: [8, 8])
        raise SpecError([Problem("sweep", f"trials {sorted(seen)} appear twice; remove the repeated sweep values")])


# ---------------------------------------------------------------------------------------------- resources


def trial_footprint(spec: JobSpec) -> dict[str, float]:
    """Logical resources one running trial holds: its workers plus Tune's trial driver."""
    r = spec.resources
    return {"CPU": r.workers_per_trial * r.cpus_per_worker + TRIAL_DRIVER_CPUS,
            "GPU": r.workers_per_trial * r.gpus_per_worker}


def cluster_problems(spec: JobSpec, cluster: dict[str, float], where: str) -> list[Problem]:
    """A trial that cannot fit the cluster at all, named by the resources field (checked before any work)."""
    r, need = spec.resources, trial_footprint(spec)
    out = []
    if need["CPU"] > cluster.get("CPU", 0):
        out.append(Problem("resources.workers_per_trial", f"{r.workers_per_trial} workers x {r.cpus_per_worker} CPUs "
                           f"+ {TRIAL_DRIVER_CPUS} for the trial driver = {need['CPU']:g} CPUs, but {where} has "
                           f"{cluster.get('CPU', 0):g}"))
    if need["GPU"] > cluster.get("GPU", 0):
        out.append(Problem("resources.gpus_per_worker", f"{r.workers_per_trial} workers x {r.gpus_per_worker} GPUs = "
                           f"{need['GPU']:g} GPUs, but {where} has {cluster.get('GPU', 0):g}"))
    return out


def max_concurrent(spec: JobSpec, cluster: dict[str, float]) -> int:
    """How many trials run at once: as many as the cluster fits, capped by sweep.max_concurrent_trials."""
    need = trial_footprint(spec)
    fits = min(int(cluster.get(k, 0) // v) for k, v in need.items() if v > 0)
    cap = spec.sweep.max_concurrent_trials
    return max(1, min(fits, cap) if cap else fits)


def local_cluster(spec: JobSpec) -> dict[str, float]:
    """The embedded Ray's logical resources: this machine's CPUs and GPUs, plus the slivers the concurrent
    trials' drivers ask for (they only wait on their workers, so they need no core of their own)."""
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    r = spec.resources
    trials = max(1, cpus // (r.workers_per_trial * r.cpus_per_worker))
    return {"CPU": cpus + trials * TRIAL_DRIVER_CPUS, "GPU": float(gpus)}
