"""The run's plots (PNG, matplotlib's Agg backend: no display needed).

- `metric_vs_bits.png`: per task, the sweep metric against bits, one line per rank (best over the other axes);
- `loftq_error.png`: per base, the mean relative weight error ||W - Q - sBA|| / ||W|| per LoftQ iteration for
  each layer type (iteration 0 is plain quantization, QLoRA's start);
- `training_curves.png`: per task, training loss and the sweep metric against step, one line per trial.
"""

from __future__ import annotations

import os
import re
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.results import TrialRecord  # noqa: E402
from orchestrator.run_dir import PLOTS_DIR  # noqa: E402
from orchestrator.spec import JobSpec, metric_for  # noqa: E402
from workers.entry_format import FULL_PRECISION_BITS  # noqa: E402


def write_plots(run_dir: str, spec: JobSpec, records: list[TrialRecord], manifests: dict[str, dict]) -> list[str]:
    """Every plot that has data; returns their paths."""
    out_dir = os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, draw in (("metric_vs_bits.png", lambda: _metric_vs_bits(spec, records)),
                       ("training_curves.png", lambda: _training_curves(spec, records)),
                       ("loftq_error.png", lambda: _loftq_errors(manifests))):
        figure = draw()
        if figure is None:
            continue
        figure.tight_layout()
        path = os.path.join(out_dir, name)
        figure.savefig(path + ".tmp.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        os.replace(path + ".tmp.png", path)
        written.append(path)
    return written


def _metric_vs_bits(spec: JobSpec, records: list[TrialRecord]):
    tasks = [t for t in spec.tasks if any(r.trial.task == t.name for r in records)]
    if not tasks:
        return None
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        metric, mode = metric_for(spec.sweep, task.type)
        best: dict[tuple[int, int], float] = {}
        for r in records:
            value = r.final.get(metric)
            if r.trial.task != task.name or value is None:
                continue
            key = (r.trial.rank, r.trial.bits)
            better = max if mode == "max" else min
            best[key] = better(best.get(key, value), value)
        for rank in sorted({k[0] for k in best}):
            points = sorted((bits, v) for (r, bits), v in best.items() if r == rank)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"rank {rank}")
        ax.set(title=f"{task.name}: {metric} ({mode})", xlabel="bits", ylabel=metric)
        ticks = sorted({k[1] for k in best})
        ax.set_xticks(ticks, [f"{b} (bf16)" if b == FULL_PRECISION_BITS else str(b) for b in ticks])  # the control
        ax.grid(alpha=0.3)
        _legend(ax)
    return figure


def _training_curves(spec: JobSpec, records: list[TrialRecord]):
    tasks = [t for t in spec.tasks if any(r.trial.task == t.name and r.history for r in records)]
    if not tasks:
        return None
    figure, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        metric, _ = metric_for(spec.sweep, task.type)
        for r in (r for r in records if r.trial.task == task.name):
            for row, key in ((0, "loss"), (1, metric)):
                points = [(h["step"], h[key]) for h in r.history if key in h and "step" in h]
                if points:
                    axes[row][col].plot(*zip(*points, strict=True), marker=".", label=r.trial.id)
        axes[0][col].set(title=f"{task.name}: training loss", xlabel="step", ylabel="loss")
        axes[1][col].set(title=f"{task.name}: {metric}", xlabel="step", ylabel=metric)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
        _legend(axes[1][col], fontsize=7)
    return figure


def _legend(ax, **kwargs) -> None:
    """A legend where something was plotted (an interrupted run may have no metric yet)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def layer_type(module: str) -> str:
    """'encoder.layer.3.attention.self.query' -> 'attention.self.query' (the layer index folded away)."""
    return re.sub(r"^.*?\.\d+\.", "", module)


def _loftq_errors(manifests: dict[str, dict]):
    with_iters = {name: m for name, m in manifests.items()
                  if any(rec.get("errors") for rec in m.get("matrices", {}).values())}
    if not with_iters:
        return None
    figure, axes = plt.subplots(1, len(with_iters), figsize=(5 * len(with_iters), 4), squeeze=False)
    for ax, (name, manifest) in zip(axes[0], sorted(with_iters.items()), strict=True):
        groups: dict[str, list[list[float]]] = {}
        for module, rec in manifest["matrices"].items():
            groups.setdefault(layer_type(module), []).append([rec["quant_error"], *rec["errors"]])
        for kind, curves in sorted(groups.items()):
            length = min(len(c) for c in curves)
            ax.plot(range(length), [statistics.fmean(c[i] for c in curves) for i in range(length)], marker="o",
                    label=kind)
        ax.set(title=name.split("__")[1] + " " + name.split("__")[2], xlabel="LoftQ iteration (0 = plain quantization)",
               ylabel="||W - Q - sBA|| / ||W||")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure
