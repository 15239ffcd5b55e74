"""Greedy generation speed on a quantized base: tokens/s beside the same model in bf16, in one process.

    python -m bench.bench_generate                 # the section-2 LLaMA shape (8 x 2048), NF4 and NF2
    python -m bench.bench_generate --shape 7b-1x256 --new 16

Evaluation of prompt_answer tasks generates every answer token by token, a forward per token. Rows: the bf16
model (transformers, no adapters); loftune's NF4 / NF2 base with r16 adapters dequantizing in every forward
(`held 0`, the path before issue 13 item 7); and the same holding each layer's dequantized weight for the whole
generate call (`weights_held`, what evaluation does now). The answers of the two loftune rows are compared
token for token. Rows alternate over repeats (median), 2 torch threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.bench_memory import _loftune_model, entry_tensors, model_dir


def generate(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


def main() -> None:
    import transformers

    from workers.qlayers import weights_held

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="2048x8-4x256")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results-generate.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ids = torch.randint(0, 30000, (1, 16), generator=torch.Generator().manual_seed(0))
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(model_dir(args.shape), dtype=torch.bfloat16).eval()
    rows: dict[str, list[float]] = {"bf16": []}
    models = {}
    for bits in (4, 2):
        entry_tensors(args.shape, bits)
        models[bits] = _loftune_model(model_dir(args.shape), args.shape, bits).eval()
        rows[f"nf{bits} per forward"], rows[f"nf{bits} held"] = [], []
    same = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate(bf16, ids, args.new)
        rows["bf16"].append(args.new / (time.perf_counter() - start))
        for bits, model in models.items():
            start = time.perf_counter()
            plain = generate(model, ids, args.new)
            rows[f"nf{bits} per forward"].append(args.new / (time.perf_counter() - start))
            start = time.perf_counter()
            with weights_held(model, torch.bfloat16):
                held = generate(model, ids, args.new)
            rows[f"nf{bits} held"].append(args.new / (time.perf_counter() - start))
            same[bits] = bool(torch.equal(plain, held))
    base = statistics.median(rows["bf16"])
    result = {"shape": args.shape, "new_tokens": args.new, "rows": {}}
    print(f"{'row':<18} {'tokens/s':>9} {'vs bf16':>8}")
    for name, values in rows.items():
        rate = statistics.median(values)
        result["rows"][name] = {"tokens_per_s": round(rate, 2), "vs_bf16": round(rate / base, 3)}
        print(f"{name:<18} {rate:9.2f} {rate / base:8.2f}")
    result["identical_answers"] = same
    print(f"identical answers with held weights: {same}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
