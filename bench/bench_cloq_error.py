"""Output error of the calibrated initialization (cloq) against LoftQ on a real LLM, per layer type.

    python -m bench.bench_cloq_error                 # SmolLM2-135M, NF2 and NF4, rank 16, iters 5
    python -m bench.bench_cloq_error --bits 2 --iters 1

Both bases are built by the service's own path (orchestrator.build.ensure_base: Ray actors, the cache), cloq on
128 training texts of jobs/data/arithmetic-train.jsonl (prompt and answer). Each matrix's relative output error
||(W - Q - BA) X^T|| / ||W X^T|| is then measured on two input sets, through the Gram matrices of the
full-precision model: the calibration texts themselves, and 128 held-out problems of arithmetic-test.jsonl
(what a fine-tuning run feeds the layers next). The table gives, per layer type and precision, the mean over the
30 blocks for LoftQ and cloq, and their ratio (cloq / LoftQ: below 1 is better).

A layer's error on the full-precision model's inputs is not what the network feels once every layer is quantized
(errors compound), so each base is also merged (Q + BA, and plain Q for QLoRA) into the model, whose language-
model loss on the 60 held-out questions of jobs/data/arithmetic.jsonl is the loss fine-tuning starts from (the
bf16 model's is the floor). Results: bench/results-cloq.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "jobs", "data")


def texts_of(file: str, n: int) -> tuple[str, ...]:
    with open(os.path.join(DATA, file)) as f:
        rows = [json.loads(line) for line in f][:n]
    return tuple(f"{r['question']} {r['answer']}" for r in rows)


def output_errors(source, cache, name: str, grams: dict, rank: int) -> dict[str, float]:
    """Per target module: the entry's relative output error on inputs with these Gram matrices."""
    from orchestrator.entry import load_entry_tensors
    from workers.cloq import damped_cholesky
    from workers.entry_format import qweight_parts
    from workers.quant import QuantizedTensor, dequantize

    tensors = load_entry_tensors(cache, name, rank=rank)
    factor_of = {}  # one Cholesky factor per distinct Gram matrix (q/k/v share one)
    out = {}
    for module, gram in grams.items():
        w = source.read(module + ".weight").float()
        q = dequantize(QuantizedTensor.from_state_dict(qweight_parts(tensors, module))).float()
        approx = q + tensors[module + ".lora_B"].float() @ tensors[module + ".lora_A"].float()
        # the plain output error: no damping beyond what a rank-deficient Gram matrix needs to factor
        r = factor_of.setdefault(id(gram), damped_cholesky(gram.float(), damping=1e-6)[0])
        out[module] = (torch.linalg.vector_norm((w - approx) @ r.T) / torch.linalg.vector_norm(w @ r.T)).item()
    return out


def start_loss(model, tokenizer, texts, tensors=None) -> float:
    """Mean next-token loss over `texts` of `model` with each target replaced by an entry's Q (+ BA)."""
    from workers.entry_format import quantized_modules, qweight_parts
    from workers.quant import QuantizedTensor, dequantize

    saved = {}
    if tensors is not None:
        params = dict(model.named_parameters())
        for module in quantized_modules(tensors):
            weight = dequantize(QuantizedTensor.from_state_dict(qweight_parts(tensors, module))).float()
            if module + ".lora_A" in tensors:
                weight = weight + tensors[module + ".lora_B"].float() @ tensors[module + ".lora_A"].float()
            saved[module] = params[module + ".weight"].data.clone()
            params[module + ".weight"].data.copy_(weight)
    total = count = 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    params = dict(model.named_parameters())
    for module, weight in saved.items():
        params[module + ".weight"].data.copy_(weight)
    return total / count


def layer_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def compare_at(bits, args, source, cache, calibration, inputs, fp32, tokenizer, eval_texts, losses) -> list[dict]:
    """Build the QLoRA, LoftQ and cloq bases at `bits`; their start losses (into `losses`) and error rows."""
    from orchestrator.build import BuildRequest, ensure_base
    from orchestrator.entry import load_entry_tensors
    from workers.quant import QuantSpec
    from workers.quant_plan import QuantPlan

    rows = []
    plan = QuantPlan(QuantSpec("nf", bits, 64))
    errors, seconds = {}, {}
    for method in ("qlora", "loftq", "cloq"):
        request = BuildRequest(source, plan, method=method, rank=args.rank, iters=args.iters,
                               calibration=calibration if method == "cloq" else None)
        start = time.perf_counter()
        result = ensure_base(request, cache, progress=False)
        seconds[method] = result.manifest["build_seconds"] if result.built else time.perf_counter() - start
        tensors = load_entry_tensors(cache, result.name, rank=args.rank if method != "qlora" else None)
        losses[f"nf{bits}-{method}"] = start_loss(fp32, tokenizer, eval_texts, tensors)
        print(f"start loss NF{bits} {method} {losses[f'nf{bits}-{method}']:.3f}", flush=True)
        if method != "qlora":
            errors[method] = {where: output_errors(source, cache, result.name, grams, args.rank)
                              for where, grams in inputs.items()}
    for kind in sorted({layer_type(m) for m in errors["loftq"]["held_out"]}):
        row = {"bits": bits, "layer": kind, "build_seconds": seconds}
        for where in inputs:
            mean = {method: statistics.fmean(e for m, e in errors[method][where].items() if layer_type(m) == kind)
                    for method in errors}
            row[where] = {**mean, "ratio": mean["cloq"] / mean["loftq"]}
        rows.append(row)
        print(f"NF{bits} {kind:<10} calibration: LoftQ {row['calibration']['loftq']:.4f} cloq "
              f"{row['calibration']['cloq']:.4f} ({row['calibration']['ratio']:.3f})   held out: LoftQ "
              f"{row['held_out']['loftq']:.4f} cloq {row['held_out']['cloq']:.4f} ({row['held_out']['ratio']:.3f})",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/loftune-bench/cloq"))
    parser.add_argument("--out", default=os.path.join(HERE, "results-cloq.json"))
    args = parser.parse_args()

    import transformers

    from orchestrator.cache import BaseCache
    from orchestrator.calibrate import load_full_precision_model
    from workers.calibration import CalibrationData, gather_grams
    from workers.model_source import open_model

    cache = BaseCache(args.cache)
    source = open_model("smollm2-135m", os.path.join(tempfile.gettempdir(), "loftune-bench-models"))
    calibration = CalibrationData(texts_of("arithmetic-train.jsonl", args.samples), 128, "arithmetic-train")
    held_out = texts_of("arithmetic-test.jsonl", args.samples)
    model = load_full_precision_model(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.path)
    targets = source.select_targets(["all-linear"])
    inputs = {"calibration": gather_grams(model, tokenizer, calibration.texts, targets, max_length=128).grams,
              "held_out": gather_grams(model, tokenizer, held_out, targets, max_length=128).grams}
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    with open(os.path.join(DATA, "arithmetic.jsonl")) as f:
        eval_texts = [json.loads(line)["text"] for line in f][540:]  # the demo's split holds out 60
    losses = {"bf16": start_loss(fp32, tokenizer, eval_texts)}
    print(f"start loss bf16 {losses['bf16']:.3f}", flush=True)
    rows = []
    for bits in args.bits:
        rows += compare_at(bits, args, source, cache, calibration, inputs, fp32, tokenizer, eval_texts, losses)
    with open(args.out, "w") as f:
        json.dump({"model": "smollm2-135m", "rank": args.rank, "iters": args.iters, "samples": args.samples,
                   "start_loss": losses, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
