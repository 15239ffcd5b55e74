"""What a sweep costs end to end, and how much of it is orchestration: `loftune run` of a spec against the same
trials' training steps in one plain PyTorch process.

    python -m bench.bench_sweep                      # jobs/minilm-demo.yaml: 4 bases, 4 trials
    python -m bench.bench_sweep --spec jobs/minilm-sentiment.yaml

The run starts cold (a fresh cache and run directory), then runs again to measure a resume. The baseline
trains each trial's model (built from the same cache entry) for the same steps and batch with AdamW in this
process, then evaluates on the same eval set: what the trial would cost without Ray, Tune, Train and DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import yaml

from orchestrator.cache import BaseCache
from orchestrator.entry import read_model_inputs
from orchestrator.spec import load_spec
from workers.tasks import load_task
from workers.train_loop import build_model
from workers.train_settings import lr_multiplier

LOFTUNE = os.path.join(os.path.dirname(sys.executable), "loftune")


def run_loftune(spec_path: str, run_dir: str) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([LOFTUNE, "run", spec_path, "--out", run_dir, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"loftune run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, json.loads(proc.stdout)


def plain_trial(spec, row: dict, cache: BaseCache, tokenizer, data) -> float:
    """The trial's steps and evaluation in this process: the work without the orchestration."""
    start = time.perf_counter()
    adapter = spec.adapter.at_rank(row["rank"])
    inputs = read_model_inputs(cache, row["base"], rank=adapter.rank, init=adapter.init)
    model = build_model(inputs.model_config, inputs.tensors, adapter, inputs.adapter_kind, data.num_labels)
    settings = spec.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=row["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(settings, s))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()
    batch = settings.micro_batch_size
    model.train()
    for step in range(settings.max_steps):
        rows = [data.train[order[(step * batch + i) % len(order)]] for i in range(batch)]
        model(**data.collate(rows)).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.eval), batch):
            model(**data.collate(data.eval[i:i + batch]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="jobs/minilm-demo.yaml")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        with open(args.spec) as f:
            data = yaml.safe_load(f)
        data["cache"] = {"uri": os.path.join(tmp, "cache")}
        spec_path = os.path.join(tmp, "job.yaml")
        with open(spec_path, "w") as f:
            yaml.safe_dump(data, f)
        cold, summary = run_loftune(spec_path, os.path.join(tmp, "run"))
        resume, _ = run_loftune(spec_path, os.path.join(tmp, "run"))
        spec = load_spec(spec_path)
        cache = BaseCache(spec.cache.uri)
        rows = summary["leaderboard"]
        tokenizer = transformers.AutoTokenizer.from_pretrained(cache.show(rows[0]["base"])["model"]["path"])
        torch.set_num_threads(spec.resources.cpus_per_worker)
        task = load_task(spec.tasks[0], tokenizer)
        plain = {r["trial"]: plain_trial(spec, r, cache, tokenizer, task) for r in rows}
    figures = {"spec": args.spec, "cold_seconds": round(cold, 1), "resume_seconds": round(resume, 1),
               "bases_built": len(summary["built"]),
               "trials": [{"trial": r["trial"], "trial_seconds": r["seconds"],
                           "plain_seconds": round(plain[r["trial"]], 1),
                           "ratio": round(r["seconds"] / plain[r["trial"]], 2), "value": r["value"]} for r in rows]}
    print(f"# {args.spec}: {len(rows)} trials, {len(summary['built'])} bases built; cold run {cold:.1f} s, "
          f"rerun (resume, nothing to do) {resume:.1f} s")
    print(f"{'trial':<34} {'in_sweep_s':>10} {'plain_s':>8} {'ratio':>6} {'metric':>7}")
    for r in figures["trials"]:
        print(f"{r['trial']:<34} {r['trial_seconds']:>10.1f} {r['plain_seconds']:>8.1f} {r['ratio']:>6.2f} "
              f"{r['value']:>7.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
