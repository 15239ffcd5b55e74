"""Fidelity on a real LLM: SmolLM2-135M fine-tuned on the arithmetic prompt -> answer task, every method through
`loftune run` (so the benchmark also runs the service at scale).

    python -m bench.bench_fidelity_llm --out runs/fidelity-llm                 # every row: many CPU-hours
    python -m bench.bench_fidelity_llm --rows loftq-nf2,cloq-nf2 --steps 300   # two rows
    python -m bench.bench_fidelity_llm --rows bf16 --lr 1e-3                   # no selection phase: a given lr
    python -m bench.bench_fidelity_llm --out runs/fidelity-llm --table         # the tables of a (partial) run
    python -m bench.bench_fidelity_llm --out runs/a,runs/b --table             # rows run side by side, merged

Two phases per row, each one job spec run by `loftune run` into `<out>/<phase>-<row>` (a rerun resumes: finished
trials are kept, bases are cache hits):
1. select: the learning rate, by the service's own Tune sweep (`sweep.lr`) on a validation split of the training
   problems (jobs/data/arithmetic-train.jsonl, `eval_fraction` held out), metric exact match, seed 0;
2. test: the chosen learning rate, `--seeds` training seeds (`sweep.num_samples`), scored on the fixed 500-problem
   test set (jobs/data/arithmetic-test.jsonl): exact match of the greedy answer and the answer perplexity.
Rows are compared seed by seed (paired differences, mean +- standard error). Every row has the same steps, batch,
rank, alpha and schedule; quantized rows use group 64 (QA-LoRA: 32), LoftQ and cloq 5 iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "jobs", "data")

# row -> its quantization section (and sweep.bits 16 for the full-precision control)
ROWS = {
    "bf16": {"bits": 16},
    "qlora-nf4": {"kind": "nf", "bits": 4, "method": "qlora"},
    "loftq-nf4": {"kind": "nf", "bits": 4, "method": "loftq"},
    "cloq-nf4": {"kind": "nf", "bits": 4, "method": "cloq"},
    "qlora-nf2": {"kind": "nf", "bits": 2, "method": "qlora"},
    "loftq-nf2": {"kind": "nf", "bits": 2, "method": "loftq"},
    "cloq-nf2": {"kind": "nf", "bits": 2, "method": "cloq"},
    "loftq-nf2-mixed4": {"kind": "nf", "bits": 2, "method": "loftq", "mixed": {"first_layers": 4, "bits": 4}},
    "qalora-int4": {"kind": "int", "bits": 4, "group_size": 32, "method": "qalora", "init": "qlora"},
    "qalora-loftq-int4": {"kind": "int", "bits": 4, "group_size": 32, "method": "qalora"},
    "qalora-int2": {"kind": "int", "bits": 2, "group_size": 32, "method": "qalora", "init": "qlora"},
    "qalora-loftq-int2": {"kind": "int", "bits": 2, "group_size": 32, "method": "qalora"},
    "qalora-cloq-int2": {"kind": "int", "bits": 2, "group_size": 32, "method": "qalora-cloq"},
}
# (row, baseline) pairs whose per-seed differences the table reports
PAIRS = [("loftq-nf2", "qlora-nf2"), ("cloq-nf2", "loftq-nf2"), ("cloq-nf2", "qlora-nf2"), ("loftq-nf4", "qlora-nf4"),
         ("cloq-nf4", "loftq-nf4"), ("qalora-loftq-int2", "qalora-int2"), ("qalora-cloq-int2", "qalora-loftq-int2"),
         ("qlora-nf4", "bf16"), ("loftq-nf4", "bf16"), ("cloq-nf4", "bf16"), ("cloq-nf2", "bf16")]
# (row, the QLoRA row of its bit width): how much of QLoRA's gap to the bf16 control the row closes
GAPS = [("loftq-nf2", "qlora-nf2"), ("cloq-nf2", "qlora-nf2"), ("loftq-nf2-mixed4", "qlora-nf2"),
        ("loftq-nf4", "qlora-nf4"), ("cloq-nf4", "qlora-nf4")]


def job_spec(row: str, phase: str, args: argparse.Namespace, lr: float | None) -> dict:
    """The job spec of one row in one phase ('select' sweeps the lr on a validation split, 'test' runs seeds)."""
    quant = {"kind": "nf", "group_size": 64, "rank": args.rank, "iters": 5, **ROWS[row]}
    init = quant.pop("init", None)
    task = {"name": "arithmetic", "type": "prompt_answer", "train_file": os.path.join(DATA, "arithmetic-train.jsonl"),
            "prompt_column": "question", "answer_column": "answer", "max_length": 64, "max_new_tokens": 32,
            "max_train_samples": args.steps * args.batch}
    if phase == "select":
        task.update(eval_fraction=0.1, max_eval_samples=args.validation)
    else:
        task.update(eval_file=os.path.join(DATA, "arithmetic-test.jsonl"), max_eval_samples=args.test)
    sweep = {"mode": "grid", "metric": "eval_exact_match"}
    if args.concurrent:
        sweep["max_concurrent_trials"] = args.concurrent
    if phase == "select":
        sweep["lr"] = args.lrs
    else:  # grid mode runs its one point num_samples times, each with a new training seed
        sweep["num_samples"] = args.seeds
    training = {"zero_stage": 2, "precision": "bf16", "micro_batch_size": args.batch, "max_steps": args.steps,
                "lr": lr or args.lrs[0], "warmup_steps": max(1, args.steps // 15), "eval_every": args.steps,
                "checkpoint_every": args.checkpoint_every or args.steps, "report_every": 10}
    spec = {"name": f"{phase}-{row}", "model": "smollm2-135m", "quantization": quant, "cache": {"uri": args.cache},
            "tasks": [task], "training": training, "adapter": {"alpha": 2 * args.rank}, "sweep": sweep,
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}}
    if init:
        spec["adapter"]["init"] = init
    return spec


def run_phase(row: str, phase: str, args: argparse.Namespace, lr: float | None = None) -> list[dict]:
    """Run (or resume) one phase of a row through `loftune run`; its leaderboard rows."""
    run_dir = os.path.join(args.out, f"{phase}-{row}")
    os.makedirs(args.out, exist_ok=True)
    spec_path = os.path.join(args.out, f"{phase}-{row}.yaml")
    with open(spec_path, "w") as f:
        yaml.safe_dump(job_spec(row, phase, args, lr), f, sort_keys=False)
    loftune = os.path.join(os.path.dirname(sys.executable), "loftune")
    proc = subprocess.run([loftune, "run", spec_path, "--out", run_dir, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} {row}: loftune run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)["leaderboard"]


def unfinished_rows(out: str) -> dict[str, dict]:
    """Rows whose test phase has not finished (stopped, or still running): the seeds done so far, read through
    `loftune results`, marked 'partial'."""
    loftune = os.path.join(os.path.dirname(sys.executable), "loftune")
    rows = {}
    for row in ROWS:
        run_dir = os.path.join(out, f"test-{row}")
        if not os.path.isdir(run_dir):
            continue
        proc = subprocess.run([loftune, "results", run_dir, "--json"], capture_output=True, text=True)
        done = [] if proc.returncode else [t for t in json.loads(proc.stdout)["leaderboard"] if t["status"] == "done"]
        if done:
            swept = os.path.isdir(os.path.join(out, f"select-{row}"))
            rows[row] = {"lr": done[0]["lr"], "lr_chosen_by": "partial-sweep" if swept else "partial", "test": done}
    return rows


def chosen_lr(rows: list[dict]) -> float:
    """The learning rate of the best validation trial (exact match, then the lower eval loss)."""
    best = max(rows, key=lambda r: (r.get("value") or 0.0, -(r.get("eval_loss") or float("inf"))))
    return float(best["lr"])


def paired(a: list[float], b: list[float], digits: int = 2) -> str:
    """Mean +- standard error of the per-seed differences a - b (seed by seed: both lists in seed order)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return f"{statistics.fmean(diffs):+.{digits}f} +- {se:.{digits}f}"


def seed_of(trial: dict) -> int:
    """A test trial's training seed: its id ends in -s<seed> (the leaderboard lists trials by place, not seed)."""
    return int(trial["trial"].rsplit("-s", 1)[1])


def table(results: dict[str, dict]) -> str:
    results = {row: {**r, "test": sorted(r["test"], key=seed_of)} for row, r in results.items()}
    lines = [f"{'row':<20} {'lr':>8} {'seeds':>5} {'exact match %':>15} {'answer loss':>11} {'answer ppl':>11}"]
    for row, r in results.items():
        em = [100 * t["value"] for t in r["test"]]
        ppl = [t.get("eval_perplexity") or float("nan") for t in r["test"]]
        spread = f"{statistics.stdev(em):.2f}" if len(em) > 1 else "-"
        given = {"given": " (given)", "partial": " (given; test phase unfinished)",
                 "partial-sweep": " (test phase unfinished)"}.get(r.get("lr_chosen_by"), "")
        loss = statistics.fmean(t.get("eval_loss") or float("nan") for t in r["test"])
        lines.append(f"{row:<20} {r['lr']:>8.0e} {len(em):>5} {statistics.fmean(em):>8.2f} +- {spread:<4} "
                     f"{loss:>11.3f} {statistics.fmean(ppl):>11.3f}{given}")
    lines += ["", f"{'paired by seed (the seeds both rows have)':<40} {'d exact match (points)':>24} "
                  f"{'d answer loss':>18}"]
    for row, base in PAIRS:
        if row in results and base in results:
            common = {seed_of(t) for t in results[row]["test"]} & {seed_of(t) for t in results[base]["test"]}
            if not common:
                continue
            tests = [[t for t in results[name]["test"] if seed_of(t) in common] for name in (row, base)]
            em = [[100 * t["value"] for t in trials] for trials in tests]
            loss = [[t.get("eval_loss") or float("nan") for t in trials] for trials in tests]
            lines.append(f"{row + ' - ' + base:<40} {paired(*em):>24} {paired(*loss, digits=3):>18}")
    return "\n".join(lines + gap_lines(results))


def gap_lines(results: dict[str, dict]) -> list[str]:
    """The share of the gap between a QLoRA row and the bf16 control that a row closes, on the means:
    (row - qlora) / (bf16 - qlora), in exact match and in answer loss."""
    if "bf16" not in results:
        return []

    def means(name: str) -> tuple[float, float]:
        tests = results[name]["test"]
        return (statistics.fmean(100 * t["value"] for t in tests),
                statistics.fmean(t.get("eval_loss") or float("nan") for t in tests))

    lines = ["", f"{'share of the QLoRA -> bf16 gap closed':<40} {'exact match':>24} {'answer loss':>18}"]
    full = means("bf16")
    for row, qlora in GAPS:
        if row in results and qlora in results:
            mine, base = means(row), means(qlora)
            shares = [(m - b) / (f - b) if f != b else float("nan") for m, b, f in zip(mine, base, full, strict=True)]
            lines.append(f"{row + ' (of ' + qlora + ')':<40} {shares[0]:>24.2f} {shares[1]:>18.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--lr", type=float, default=None, help="skip the selection phase and test at this learning "
                                                              "rate (the table marks it 'given')")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the test phase")
    parser.add_argument("--validation", type=int, default=200, help="validation problems the lr is chosen on")
    parser.add_argument("--test", type=int, default=500, help="test problems scored")
    parser.add_argument("--concurrent", type=int, default=None, help="trials at once per phase (default: as many "
                                                                     "as the CPUs fit; 1 lets rows run side by side)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between a trial's checkpoints "
                        "(default: only at the end, as the recorded runs did; smaller lets a killed trial resume)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/loftune-bench/fidelity-llm"))
    parser.add_argument("--out", default="runs/fidelity-llm")
    parser.add_argument("--table", action="store_true", help="only print the tables of what has run")
    args = parser.parse_args()
    if "," in args.out and not args.table:
        raise SystemExit("--out: several folders (comma-separated) only go with --table, which merges their rows")
    results = {}
    for out in args.out.split(","):  # rows run side by side in separate folders, merged for the tables
        if os.path.exists(os.path.join(out, "results.json")):
            with open(os.path.join(out, "results.json")) as f:
                results.update(json.load(f))
        if args.table:
            results.update({row: r for row, r in unfinished_rows(out).items() if row not in results})
    results_file = os.path.join(args.out, "results.json")
    if not args.table:
        for row in args.rows.split(","):
            if row not in ROWS:
                raise SystemExit(f"--rows: unknown row {row!r}; expected some of {list(ROWS)}")
            if args.lr is None:
                lr, chosen_by = chosen_lr(run_phase(row, "select", args)), "sweep"
                print(f"{row}: lr {lr:g} chosen on the validation split", flush=True)
            else:
                lr, chosen_by = args.lr, "given"
            results[row] = {"lr": lr, "lr_chosen_by": chosen_by, "test": run_phase(row, "test", args, lr)}
            with open(results_file, "w") as f:
                json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
