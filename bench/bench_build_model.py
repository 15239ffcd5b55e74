"""Peak memory of a training worker building its task model from a cache entry: the old build against build_model.

    python -m bench.bench_build_model                # LLaMA-2-7B-shaped layers (hidden 4096, MLP 11008), 2 of them
    python -m bench.bench_build_model --layers 4 --work /tmp/bbm

A LLaMA-shaped fp16 model (vocab 32000, untied head) is written once as safetensors and built into a cache
(NF4 group 64, QLoRA: no LoftQ iterations, so the build takes about a minute). Then each way of building the
model runs in a fresh process: it loads the entry's tensors (what a worker receives from the object store),
resets the high-water mark (writes "5" to /proc/self/clear_refs), builds the causal LM with rank-16 adapters and
reads VmHWM from /proc/self/status. "old" is the build before issue 13 (the whole model from its config with
random init, then surgery); "meta" is workers.train_loop.build_model. Both run with the config's own dtype
(float16, as LLaMA-2's config.json says) and with float32 (a config that names no dtype, or float32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

SEVEN_B_SHAPED = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096,
    intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    tie_word_embeddings=False,
)
MIB = 1 << 20


def write_model(path: str, layers: int) -> str:
    """The 7B-shaped model with `layers` blocks, random fp16 weights (fixed seed), written once."""
    import torch
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{k: v for k, v in SEVEN_B_SHAPED.items() if k != "model_type"},
                                          num_hidden_layers=layers, dtype="float16")
        transformers.LlamaForCausalLM(config).half().save_pretrained(path)
    return path


def build_entry(model_dir: str, cache_dir: str) -> str:
    """The model's NF4 QLoRA entry in the cache at `cache_dir` (built on 2 Ray actors unless cached)."""
    import ray

    from orchestrator.build import BuildRequest, ensure_base
    from orchestrator.cache import BaseCache
    from workers.model_source import ModelSource
    from workers.quant import QuantSpec
    from workers.quant_plan import QuantPlan

    request = BuildRequest(ModelSource(model_dir), QuantPlan(QuantSpec("nf", 4, 64)), method="qlora", rank=16)
    result = ensure_base(request, BaseCache(cache_dir), actors=2, progress=False)
    if ray.is_initialized():
        ray.shutdown()
    return result.name


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def old_build(job, tensors):
    """The build before issue 13: the full model from its config, randomly initialized, then replaced."""
    import transformers

    from workers.surgery import apply_quantized_base
    from workers.train_loop import _entry_prefix

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**job.model_config))
    apply_quantized_base(model, tensors, rank=job.adapter.rank, alpha=job.adapter.alpha, init=job.adapter.init,
                         prefix=_entry_prefix(model, tensors))
    return model


def one(way: str, dtype: str, cache_dir: str, entry: str) -> dict:
    """In a fresh process: load the entry, reset the high-water mark, build, and report the memory."""
    import torch

    from orchestrator.cache import BaseCache
    from orchestrator.entry import load_entry_tensors
    from workers.train_loop import JobConfig, build_model
    from workers.train_settings import AdapterSettings, TrainSettings

    torch.set_num_threads(1)  # a worker's default (threads_per_worker)
    import transformers.models.llama.modeling_llama  # noqa: F401  (library imports are not the build's memory)
    cache = BaseCache(cache_dir)
    config = {**cache.show(entry)["model"]["config"], "dtype": dtype}
    job = JobConfig(model_config=config, base_ref=None, adapter_kind="lora", training=TrainSettings(),
                    adapter=AdapterSettings(rank=16, alpha=32, init="qlora"), task=None, tokenizer_dir="")
    tensors = load_entry_tensors(cache, entry, verify=False)
    entry_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    start = time.perf_counter()
    model = build_model(config, tensors, job.adapter, "lora", None) if way == "meta" else old_build(job, tensors)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    assert sum(t.is_meta for t in model.parameters()) == 0
    return {"way": way, "dtype": dtype, "seconds": seconds, "rss_before_mib": before / 1024,
            "peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024, "entry_mib": entry_bytes / MIB}


def run_one(way: str, dtype: str, cache_dir: str, entry: str) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_build_model", "--one", way, dtype, cache_dir, entry]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    from workers.model_source import ModelSource

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", default=None, help="keep the model and cache here (default: a temporary folder)")
    parser.add_argument("--one", nargs=4, metavar=("WAY", "DTYPE", "CACHE", "ENTRY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        start = time.perf_counter()
        model_dir = write_model(os.path.join(work, f"llama-7b-shaped-{args.layers}l"), args.layers)
        cache_dir = os.path.join(work, "cache")
        entry = build_entry(model_dir, cache_dir)
        print(f"# 7B-shaped LLaMA, {args.layers} layers (hidden 4096, MLP 11008, vocab 32000), NF4 g64 QLoRA r16; "
              f"model written and built in {time.perf_counter() - start:.0f} s", flush=True)
        rows = [run_one(way, dtype, cache_dir, entry) for dtype in ("float16", "float32") for way in ("old", "meta")]
        params = sum(math.prod(info.shape) for info in ModelSource(model_dir).tensors.values())
    print(f"# model: {params / 1e9:.3f} B parameters, bf16 size {params * 2 / MIB:.0f} MiB; "
          f"entry {rows[0]['entry_mib']:.0f} MiB (resident before each build)")
    print(f"{'build':<6} {'config dtype':<13} {'before MiB':>10} {'peak MiB':>9} {'peak-before':>11} {'seconds':>8}")
    for r in rows:
        print(f"{r['way']:<6} {r['dtype']:<13} {r['rss_before_mib']:>10.0f} {r['peak_mib']:>9.0f} "
              f"{r['growth_mib']:>11.0f} {r['seconds']:>8.2f}")


if __name__ == "__main__":
    main()
