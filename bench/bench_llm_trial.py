"""One real trial at LLM scale, end to end: `loftune run` on a LLaMA-2-7B-shaped model read from a safetensors
directory (not a built-in), NF4 base built by the Ray builder, one Ray Train + DeepSpeed ZeRO-2 bf16 worker.

    python -m bench.bench_llm_trial                  # 4 blocks of hidden 4096 / MLP 11008 (about 5 minutes)
    python -m bench.bench_llm_trial --bits 2 --steps 6

The model is bench_memory's (seeded random weights, bf16 safetensors, with MiniLM's tokenizer lent to it); the
task is causal LM on texts of about 256 tokens made from jobs/data/arithmetic.jsonl. The worker reports its own
peak resident memory (VmHWM) with every report; the table puts it beside the model's bf16 size and the entry's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from bench.bench_memory import model_dir

LOFTUNE = os.path.join(os.path.dirname(sys.executable), "loftune")
ARITHMETIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "data",
                          "arithmetic.jsonl")


def with_tokenizer(path: str) -> str:
    """Lend MiniLM's tokenizer (30,522 ids, inside the model's 32,000) to the model directory (JSON files only)."""
    from workers.model_source import minilm_path

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = os.path.join(minilm_path(), name)
        if os.path.isfile(source) and not os.path.isfile(os.path.join(path, name)):
            shutil.copyfile(source, os.path.join(path, name))
    return path


def long_texts(path: str, rows: int, per_text: int = 8) -> str:
    """A jsonl of `rows` texts, each `per_text` arithmetic lines joined (about 256 tokens)."""
    with open(ARITHMETIC) as f:
        lines = [json.loads(line)["text"] for line in f]
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.sample(lines, per_text))}) + "\n")
    return path


def spec(model: str, data: str, cache: str, bits: int, steps: int) -> dict:
    return {
        "name": "llm-trial", "model": model, "cache": {"uri": cache},
        "quantization": {"kind": "nf", "bits": bits, "group_size": 64, "method": "qlora", "rank": 16, "iters": 0},
        "tasks": [{"name": "arith", "type": "causal_lm", "train_file": data, "max_length": 256,
                   "max_eval_samples": 4}],
        "training": {"zero_stage": 2, "precision": "bf16", "micro_batch_size": 1, "max_steps": steps,
                     "eval_every": steps, "checkpoint_every": steps, "report_every": 1, "max_eval_batches": 2,
                     "lr": 1e-4, "warmup_steps": 0},
        "adapter": {"alpha": 32},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 2, "build_actors": 2},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="7b-1x256")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default="bench/results-llm-trial.json")
    args = parser.parse_args()
    model = with_tokenizer(model_dir(args.shape))
    weights = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        data = long_texts(os.path.join(tmp, "texts.jsonl"), rows=64)
        path = os.path.join(tmp, "job.json")
        with open(path, "w") as f:
            json.dump(spec(model, data, os.path.join(tmp, "cache"), args.bits, args.steps), f)
        start = time.perf_counter()
        proc = subprocess.run([LOFTUNE, "run", path, "--out", os.path.join(tmp, "run"), "--json"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"loftune run failed:\n{proc.stderr[-4000:]}")
        summary = json.loads(proc.stdout)
        [row] = summary["leaderboard"]
        entry = os.path.join(tmp, "cache", "bases", row["base"])
        entry_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(entry) for f in fs)
        with open(os.path.join(tmp, "run", "trials", row["trial"], "reports.jsonl")) as f:
            reports = [json.loads(line) for line in f]
    peak = max(r.get("worker_peak_rss_mib") or 0 for r in reports)
    result = {"shape": args.shape, "bits": args.bits, "steps": args.steps, "run_seconds": round(seconds, 1),
              "model_bf16_mib": round(weights / 2**20), "entry_mib": round(entry_bytes / 2**20),
              "worker_peak_rss_mib": round(peak), "peak_over_bf16": round(peak / (weights / 2**20), 3),
              "status": row["status"], "loss": row["loss"], "step": row["step"],
              "samples_per_s": [round(r["samples_per_s"], 3) for r in reports if "samples_per_s" in r]}
    print(json.dumps(result, indent=1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
