"""The rules of a job spec that span its sections, and the metrics each task type reports: what
`orchestrator.spec.build_spec` checks once every section is typed (each section checks its own fields). Rules that
need the model or the cluster are the planner's (orchestrator/plan.py)."""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING

from orchestrator.errors import Problem
from orchestrator.typed_yaml import URI_SCHEME
from workers.entry_format import CALIBRATED_METHODS, FULL_PRECISION_BITS, adapter_for
from workers.messages import brief

if TYPE_CHECKING:
    from orchestrator.spec import Adapter, Cache, Quantization, Sweep

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


def cross_field_problems(q: Quantization, sweep: Sweep, adapter: Adapter, tasks: list) -> list[Problem]:
    """Rules that span sections (those that need the model or the cluster are checked by the planner)."""
    out = []
    if sweep.metric is not None:
        for i, task in enumerate(tasks):
            reported = TASK_METRICS.get(task.type)
            if reported and sweep.metric not in (*reported, "loss"):
                out.append(Problem("sweep.metric", f"{brief(sweep.metric)} is not reported by tasks[{i}] "
                                                   f"({task.type}); expected one of {[*reported, 'loss']}"))
    names = [task.name for task in tasks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        out.append(Problem("tasks", f"the name {brief(name)} is used twice; task names must be unique (they name "
                                    f"the results)"))
    methods = swept_methods(q, sweep)
    if adapter.init == "loftq" and (set(methods) == {"qlora"} or q.iters == 0):
        what = f"sweep.method {methods}" if sweep.method else f"quantization.method {q.method!r}"
        out.append(Problem("adapter.init", f"'loftq' starts from LoftQ factors, but {what} with iters {q.iters} "
                                           f"stores none; use init 'qlora' or method 'loftq' with iters >= 1"))
    if only_full_precision(q, sweep):
        out += _full_precision_problems(q, sweep, adapter.init)
    return out + _calibration_problems(q, methods)


def _calibration_problems(q: Quantization, methods: list[str]) -> list[Problem]:
    """A calibrated method alternates at least once. (Calibration data beside uncalibrated methods only scores
    their bases: each matrix's output error goes into the manifest.)"""
    calibrated = [m for m in methods if m in CALIBRATED_METHODS]
    if calibrated and q.iters < 1:
        return [Problem("quantization.iters", f"{calibrated[0]!r} alternates quantization with its weighted "
                                              f"low-rank step at least once: expected >= 1, got {q.iters}")]
    return []


def swept_methods(q: Quantization, sweep: Sweep) -> list[str]:
    """The methods the sweep's quantized trials use: sweep.method, else quantization.method."""
    return list(sweep.method or [q.method])


def only_full_precision(q: Quantization, sweep: Sweep) -> bool:
    """Whether every trial is the full-precision control (bits 16): then nothing of quantization applies."""
    return all(bits == FULL_PRECISION_BITS for bits in sweep.bits or [q.bits])


def _full_precision_problems(q: Quantization, sweep: Sweep, init: str | None) -> list[Problem]:
    """Fields that only mean something for a quantized base, given to a spec whose every trial is bits 16 (plain
    LoRA over the bf16 base). In a sweep that also has quantized bits they apply to those trials only."""
    where = "sweep.bits" if sweep.bits else "quantization.bits"
    why = f"every trial is bits 16 ({where}: LoRA over the bf16 base)"
    fix = "or sweep quantized bits beside 16 in sweep.bits"
    out = []
    pooled = [m for m in swept_methods(q, sweep) if adapter_for(m) == "qalora"]
    if pooled:
        out.append(Problem("quantization.method", f"{pooled[0]!r} pools its adapter over INT quantization groups, but "
                                                  f"{why}, which has none; use method 'loftq' or 'qlora' (plain LoRA "
                                                  f"at bits 16), {fix}"))
    if sweep.method:
        out.append(Problem("sweep.method", f"{why}, whose base is not quantized by any method; remove sweep.method, "
                                           f"{fix}"))
    if sweep.group_size:
        out.append(Problem("sweep.group_size", f"{why}, which has no quantization groups; remove sweep.group_size, "
                                               f"{fix}"))
    for name, given in (("mixed", q.mixed is not None), ("overrides", bool(q.overrides)),
                        ("calibration", q.calibration is not None)):
        if given:
            out.append(Problem(f"quantization.{name}", f"{why}, which quantizes no layer; remove quantization.{name}, "
                                                       f"{fix}"))
    if init == "loftq":
        out.append(Problem("adapter.init", f"'loftq' starts from LoftQ factors, but {why}, which stores none; use "
                                           f"init 'qlora' (A random, B = 0: plain LoRA)"))
    return out


def sweep_size_problems(sweep: Sweep, num_tasks: int) -> list[Problem]:
    """A sweep over sweep.max_trials trials, counted arithmetically: the planner expands every point, so an
    oversized sweep must stop here (a 6.5M-value axis once ran the planner out of memory)."""
    if not isinstance(sweep.max_trials, int) or sweep.max_trials < 1:
        return []  # reported by Sweep.problems
    points = sweep.num_points()
    trials = points * max(num_tasks, 1)
    if trials <= sweep.max_trials:
        return []
    return [Problem("sweep.max_trials", f"the sweep has {trials:,} trials ({points:,} point(s) x {max(num_tasks, 1)} "
                                        f"task(s)), more than sweep.max_trials {sweep.max_trials:,}; narrow the sweep "
                                        f"or raise sweep.max_trials")]


CACHE_SCHEMES = ("", "file", "s3")


def cache_problems(cache: Cache) -> list[Problem]:
    """cache.uri must name a directory (existing or to be created) or s3://bucket[/prefix]."""
    uri = cache.uri
    if uri is None:
        return []
    expected = f"expected a directory or s3://bucket/prefix, got {brief(uri)}"
    match = URI_SCHEME.match(uri)
    scheme = match.group(0)[:-3].lower() if match else ""
    if scheme not in CACHE_SCHEMES:
        return [Problem("cache.uri", f"{expected} (unsupported scheme {brief(scheme)})")]
    parts = urllib.parse.urlsplit(uri) if scheme else None
    if scheme == "s3":
        if "@" in parts.netloc:  # do not echo it: the uri holds a secret
            return [Problem("cache.uri", "credentials do not belong in an s3:// uri; set AWS_ACCESS_KEY_ID / "
                                         "AWS_SECRET_ACCESS_KEY instead")]
        ok = parts.netloc and not parts.query and not parts.fragment
        return [] if ok else [Problem("cache.uri", f"{expected} (no bucket)")]
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        return [Problem("cache.uri", f"{expected} (file:// takes a local path, file:///path, not a host)")]
    path = os.path.abspath(os.path.expanduser(urllib.parse.unquote(parts.path) if parts else uri))
    blocker = _non_directory_on(path)
    if blocker is None:
        return []
    where = "it exists" if blocker == path else f"{brief(blocker)} exists on its path"
    return [Problem("cache.uri", f"{expected} ({where} and is not a directory)")]


def _non_directory_on(path: str) -> str | None:
    """The first existing path on the way to `path` (it, or its nearest existing parent) when that is not a
    directory: then no cache directory can be there."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path
