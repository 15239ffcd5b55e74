"""Dequantization speed on LLaMA-7B-shaped matrices, in GB/s of output, against this machine's memory bandwidth.

    python -m bench.bench_dequant                      # the table in BENCHMARKS.md (~2 min on 2 cores)
    python -m bench.bench_dequant --threads 2 --repeats 9 --json bench/results-dequant.json
    python -m bench.bench_dequant --repeats 9 --rerun 4096x11008/nf4-g64/bf16   # measure a row that moved again

For each matrix (4096x11008 and 11008x4096), quantizer and output dtype, in the same run:
- `fresh`: `dequantize(q, dtype)`, a new output every call (the public function; what the old layer did);
- `reused`: `dequantize(q, dtype, out=buf)` into one buffer: the decoding alone, without the page faults of a
  fresh output; this is the training path (QuantMatmul reuses one per-thread buffer for the transient weight);
- `1-span`: as `fresh` with the whole matrix as one span (what the CPU would do without spans);
- `old`: the implementation before this one (int32 shift unpacking, then row blocks of 2^18 weights).
GB/s counts the output bytes written. The physical limit is `copy_` of a bf16 tensor of the output's bytes into
another (read + write, GB/s of both); `clone()` of it is the same copy into newly allocated memory. Each row times
all of these round-robin, `--repeats` rounds after a warm-up one, and reports medians: load from other jobs then
falls on the row's figures alike (the load average is recorded with each row; rerun a row that moved).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workers import quant
from workers.qlayers import QuantLoraLinear
from workers.quant import QuantizedTensor, QuantSpec, dequantize, nf_codebook, quantize

SHAPES = [(4096, 11008), (11008, 4096)]
SPECS = [QuantSpec("nf", 4, 64), QuantSpec("nf", 2, 64), QuantSpec("int", 4, 32), QuantSpec("int", 2, 64)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYER_SHAPE, TOKENS = (4096, 11008), 256  # the layer whose saved bytes and step are measured, micro-batch 1 x 256


def old_dequantize(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The previous `dequantize`, frozen: the speed baseline here, and the reference that
    tests/workers/test_quant.py holds the fast path to, bit for bit."""
    unit_codes, unit_bytes = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}[q.spec.bits]
    bits, (out_f, in_f) = q.spec.bits, q.shape
    byte_shifts = torch.arange(unit_bytes, dtype=torch.int32) * 8
    value = (q.packed.view(-1, unit_bytes).to(torch.int32) << byte_shifts).sum(dim=1, dtype=torch.int32)
    code_shifts = torch.arange(unit_codes, dtype=torch.int32) * bits
    codes = ((value[:, None] >> code_shifts) & ((1 << bits) - 1)).reshape(-1)[: out_f * in_f].to(torch.uint8)
    codes = codes.view(out_f, in_f)
    groups = in_f // q.spec.group_size
    out = torch.empty(out_f, in_f, dtype=dtype)
    book = nf_codebook(bits) if q.spec.kind == "nf" else None
    step = max(1, (1 << 18) // in_f)
    for start in range(0, out_f, step):
        rows = slice(start, min(start + step, out_f))
        c = codes[rows].reshape(-1, groups, q.spec.group_size)
        s = q.scales[rows].float()[..., None]
        values = book[c.long()] * s if book is not None else c.float().mul_(s).add_(q.zeros[rows].float()[..., None])
        out[rows] = values.view(-1, in_f)
    return out


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    return interleaved_medians({"fn": fn}, repeats)["fn"]


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (one call of each per round, after a warm-up round)
    so that load from other jobs falls on all of them alike and their ratios hold."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def one_span(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    saved, quant.CPU_SPAN_NUMEL = quant.CPU_SPAN_NUMEL, 1 << 62
    try:
        return dequantize(q, dtype)
    finally:
        quant.CPU_SPAN_NUMEL = saved


def measure(q: QuantizedTensor, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Output GB/s of the new dequantization (fresh / reused output / one span) and of the old one, and the
    memory bandwidth beside them: a bf16 copy_ of the output's bytes (read + write GB/s), reused and fresh."""
    out_bytes = q.shape[0] * q.shape[1] * dtype.itemsize
    buf = torch.empty(q.shape, dtype=dtype)
    src = torch.randn(out_bytes // 2).to(torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({
        "fresh": lambda: dequantize(q, dtype),
        "reused": lambda: dequantize(q, dtype, out=buf),
        "one_span": lambda: one_span(q, dtype),
        "old": lambda: old_dequantize(q, dtype),
        "copy": lambda: dst.copy_(src),
        "fresh_copy": src.clone,
    }, repeats)
    row = {f"{name}_gbs": out_bytes / 1e9 / seconds[name] for name in ("fresh", "reused", "one_span", "old")}
    row["copy_rw_gbs"] = 2 * out_bytes / 1e9 / seconds["copy"]
    row["fresh_copy_rw_gbs"] = 2 * out_bytes / 1e9 / seconds["fresh_copy"]
    row["speedup_vs_old"] = row["fresh_gbs"] / row["old_gbs"]  # both into a fresh output
    row["training_speedup_vs_old"] = row["reused_gbs"] / row["old_gbs"]  # QuantMatmul reuses one buffer
    row["load"] = os.getloadavg()[0]
    return row


def saved_by_autograd(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while fn() runs."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def saved_for_backward(shape: tuple[int, int], tokens: int) -> dict[str, int]:
    """Bytes autograd keeps between forward and backward for one NF4 g64 r16 layer at bf16, old vs new forward.

    Old: F.linear over the dequantized weight (what QuantLoraLinear did). New: QuantLoraLinear's QuantMatmul.
    Bytes that are the module's own buffers / parameters (kept by reference) are counted apart.
    """
    gen = torch.Generator().manual_seed(0)
    layer = QuantLoraLinear(quantize(torch.randn(shape, generator=gen) * 0.02, QuantSpec("nf", 4, 64)), rank=16)
    layer.to(torch.bfloat16)
    x = torch.randn(1, tokens, shape[1], dtype=torch.bfloat16, requires_grad=True)
    own = {t.untyped_storage().data_ptr() for t in [*layer.buffers(), *layer.parameters()]}

    def old_forward():
        y = F.linear(x, layer.dequantized_weight(x.dtype))
        return y + layer.scale * F.linear(F.linear(x, layer.lora_A), layer.lora_B)

    out = {}
    for name, fn in [("old", old_forward), ("new", lambda: layer(x))]:
        kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved_by_autograd(fn)}
        out[f"{name}_bytes"] = sum(n for p, n in kept.items() if p not in own)
        out[f"{name}_referenced_bytes"] = sum(n for p, n in kept.items() if p in own)
    return out


def layer_step(shape: tuple[int, int], tokens: int, repeats: int) -> dict[str, float]:
    """Forward + backward seconds of one NF4 g64 r16 bf16 layer: the old forward (F.linear over the old
    dequantization, whose weight autograd kept) against QuantLoraLinear (two dequantizations, nothing kept)."""
    gen = torch.Generator().manual_seed(0)
    layer = QuantLoraLinear(quantize(torch.randn(shape, generator=gen) * 0.02, QuantSpec("nf", 4, 64)), rank=16)
    layer.to(torch.bfloat16)
    x = torch.randn(1, tokens, shape[1], dtype=torch.bfloat16, requires_grad=True)

    def old_step():
        y = F.linear(x, old_dequantize(layer.quantized, x.dtype))
        (y + layer.scale * F.linear(F.linear(x, layer.lora_A), layer.lora_B)).sum().backward()

    return {"old_s": median_seconds(old_step, max(3, repeats // 3)),
            "new_s": median_seconds(lambda: layer(x).sum().backward(), repeats)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "thp": thp.read_text().strip() if thp.exists() else "?",
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}


def print_table(result: dict) -> None:
    print("GB/s of output written; limit: bf16 copy_ of the output's bytes, read + write GB/s (fresh: clone())")
    print(f"{'shape':>11} {'quant':>9} {'out':>4} {'fresh':>6} {'reused':>6} {'1-span':>6} {'old':>5} "
          f"{'limit':>5} {'fresh':>5} {'fresh/old':>9} {'reused/old':>10} {'reused/limit':>12} {'load':>4}")
    for r in result["rows"]:
        print(f"{r['shape']:>11} {r['quant']:>9} {r['dtype']:>4} {r['fresh_gbs']:6.2f} {r['reused_gbs']:6.2f} "
              f"{r['one_span_gbs']:6.2f} {r['old_gbs']:5.2f} {r['copy_rw_gbs']:5.1f} {r['fresh_copy_rw_gbs']:5.1f} "
              f"{r['speedup_vs_old']:8.1f}x {r['training_speedup_vs_old']:9.1f}x "
              f"{r['reused_gbs'] / r['copy_rw_gbs']:12.2f} {r['load']:4.1f}")
    if "saved_for_backward" in result:
        s = result["saved_for_backward"]
        print(f"saved for backward, {s['shape']} NF4 r16 bf16, 1x{s['tokens']} tokens: old {s['old_bytes'] / 2**20:.1f}"
              f" MiB, new {s['new_bytes'] / 2**20:.1f} MiB (+ {s['new_referenced_bytes'] / 2**20:.1f} MiB of the "
              f"layer's own buffers / parameters, by reference)")
    if "layer_step" in result:
        s = result["layer_step"]
        print(f"forward + backward of that layer: old {s['old_s'] * 1e3:.0f} ms, new {s['new_s'] * 1e3:.0f} ms")


def measure_rows(keys: set[str] | None, repeats: int) -> list[dict]:
    """Every (shape, quantizer, dtype) row, or only those whose `shape/quant/dtype` key is in `keys`."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        weight = torch.randn(shape, generator=gen) * 0.02
        for spec in SPECS:
            wanted = [n for n in DTYPES if keys is None or f"{shape[0]}x{shape[1]}/{spec.name}/{n}" in keys]
            q = quantize(weight, spec) if wanted else None
            for name in wanted:
                row = {"shape": f"{shape[0]}x{shape[1]}", "quant": spec.name, "dtype": name}
                rows.append({**row, **measure(q, DTYPES[name], repeats)})
                print(rows[-1], flush=True)
    return rows


def rerun_rows(path: Path, keys: set[str], repeats: int) -> dict:
    """Measure the named rows again and put them in place in the results at `path` (marked `rerun`)."""
    result = json.loads(path.read_text())
    fresh = {f"{r['shape']}/{r['quant']}/{r['dtype']}": {**r, "rerun": True} for r in measure_rows(keys, repeats)}
    result["rows"] = [fresh.get(f"{r['shape']}/{r['quant']}/{r['dtype']}", r) for r in result["rows"]]
    if "layer" in keys:
        result["layer_step"] = {**result["layer_step"], **layer_step(LAYER_SHAPE, TOKENS, repeats), "rerun": True}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="bench/results-dequant.json")
    parser.add_argument("--rerun", nargs="+", metavar="SHAPE/QUANT/DTYPE",
                        help="rows to measure again into --json, e.g. 4096x11008/nf4-g64/bf16 (`layer`: the layer)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rerun:
        result = rerun_rows(Path(args.json), set(args.rerun), args.repeats)
    else:
        result = {"machine": machine(), "load_before": os.getloadavg(), "repeats": args.repeats,
                  "rows": measure_rows(None, args.repeats)}
        layer = {"shape": "4096x11008", "tokens": TOKENS}
        result["saved_for_backward"] = {**layer, **saved_for_backward(LAYER_SHAPE, TOKENS)}
        result["layer_step"] = {**layer, **layer_step(LAYER_SHAPE, TOKENS, args.repeats)}
        result["load_after"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)


if __name__ == "__main__":
    main()
