"""Benchmark of the distributed base builder and the cache.

    python -m bench.bench_build              # MiniLM-L6 and a LLaMA-shaped model (8 layers, hidden 2048)
    python -m bench.bench_build --quick      # MiniLM-L6 only

For each model: build time with 1 and 2 actors (1 thread each) in the same run (speedup = ratio),
cache-hit load time vs build time, the builder's peak RSS vs the full-precision model size, and the
entry's size vs the fp16 size of the model. Each build runs in a fresh subprocess so that its peak RSS
(ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LLAMA_SHAPED = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=1024, hidden_size=2048,
    intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
    max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="float16",
)


def make_llama_shaped(path: str) -> str:
    """Write a LLaMA-shaped fp16 checkpoint (random init, fixed seed) once."""
    import torch
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{k: v for k, v in LLAMA_SHAPED.items() if k != "model_type"})
        model = transformers.LlamaForCausalLM(config).half()
        model.save_pretrained(path, safe_serialization=True)
    return path


class RssSampler:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import threading

        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_build(model: str, cache_dir: str, actors: int, bits: int, iters: int) -> dict:
    """Run in a subprocess: build (or hit) one base and report times and peak RSS."""
    import ray

    from orchestrator.build import BuildRequest, connect, ensure_base
    from orchestrator.cache import BaseCache
    from orchestrator.entry import BASE_SHARD_PREFIX, load_entry_tensors
    from workers.model_source import open_model
    from workers.quant import QuantSpec
    from workers.quant_plan import QuantPlan

    start_all = time.perf_counter()
    connect(num_cpus=max(2, actors))
    cache = BaseCache(cache_dir)
    source = open_model(model, cache_dir)
    request = BuildRequest(source, QuantPlan(QuantSpec("nf", bits, 64)), rank=16, iters=iters)
    _ = source.fingerprint  # hashing the weight files is timed separately (fingerprint_s)
    _ = source.linear_modules  # imports transformers: count library imports out of the build's memory
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    fingerprint_s = time.perf_counter() - start_all
    with RssSampler() as rss:
        result = ensure_base(request, cache, actors=actors, progress=False)
    start = time.perf_counter()
    load_entry_tensors(cache, result.name, rank=16)  # what a trainer reads on a hit
    load_s = time.perf_counter() - start
    fp_bytes = sum(os.path.getsize(os.path.join(source.path, f)) for f in source.files)
    entry_bytes = sum(meta["bytes"] for meta in result.manifest["files"].values())
    base_bytes = sum(meta["bytes"] for path, meta in result.manifest["files"].items()
                     if path.rsplit("/", 1)[-1].startswith(BASE_SHARD_PREFIX))
    ray.shutdown()
    return {"built": result.built, "seconds": result.seconds, "load_s": load_s, "fp_file_bytes": fp_bytes,
            "entry_bytes": entry_bytes, "params": sum(r["shape"][0] * r["shape"][1]
                                                        for r in result.manifest["matrices"].values()),
            "base_bytes": base_bytes, "baseline_rss": rss.start, "peak_rss": rss.peak,
            "fingerprint_s": fingerprint_s,
            "matrix_seconds": sum(r["seconds"] for r in result.manifest["matrices"].values())}


def run_one(model: str, cache_dir: str, actors: int, bits: int, iters: int) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_build", "--one", model, cache_dir, str(actors), str(bits), str(iters)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_model(label: str, model: str, bits: int, iters: int, work: str) -> dict:
    runs = {}
    for actors in (1, 2):
        cache_dir = os.path.join(work, f"{label}-a{actors}")
        runs[actors] = run_one(model, cache_dir, actors, bits, iters)
    hit = run_one(model, os.path.join(work, f"{label}-a2"), 2, bits, iters)
    assert not hit["built"], "second run should be a cache hit"
    fp16_bytes = runs[1]["params"] * 2
    row = {
        "model": label, "quant": f"nf{bits}-g64 loftq-t{iters} r16", "matrices_params": runs[1]["params"],
        "build_1_actor_s": runs[1]["seconds"], "build_2_actors_s": runs[2]["seconds"],
        "speedup": runs[1]["seconds"] / runs[2]["seconds"],
        "hit_s": hit["seconds"] + hit["load_s"], "hit_vs_build": (hit["seconds"] + hit["load_s"]) / runs[2]["seconds"],
        "matrix_cpu_s": runs[1]["matrix_seconds"],
        "build_rss_growth_mib": (runs[2]["peak_rss"] - runs[2]["baseline_rss"]) / 2**20,
        "fp_file_mib": runs[2]["fp_file_bytes"] / 2**20,
        "entry_mib": runs[2]["entry_bytes"] / 2**20,
        "quantized_linears_vs_fp16": runs[2]["base_bytes"] / fp16_bytes,
    }
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=5, metavar=("MODEL", "CACHE", "ACTORS", "BITS", "ITERS"), help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.one:
        model, cache_dir, actors, bits, iters = args.one
        print(json.dumps(one_build(model, cache_dir, int(actors), int(bits), int(iters))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="loftune-bench-") as work:
        rows.append(bench_model("minilm-l6", "minilm-l6", 2, 5, work))
        if not args.quick:
            llama = make_llama_shaped(os.path.join(work, "llama-shaped-8x2048"))
            rows.append(bench_model("llama-8x2048", llama, 2, 5, work))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
