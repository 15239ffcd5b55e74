"""Training step time and frozen-base memory: quantized-base LoRA vs full-precision LoRA, same model, same run.

    python -m bench.bench_train                 # MiniLM-L6, batch 16 x 64 tokens, rank 16, NF2 / NF4 / INT4
    python -m bench.bench_train --steps 30

Both sides train the same adapters (rank 16 on every encoder linear) with AdamW in one process; the baseline
is peft's LoRA over the full-precision fp32 model. Timings alternate between the models so that machine noise
hits both alike; the table reports medians and their ratio (target <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers
from safetensors import safe_open

from workers.calibration import gather_grams
from workers.cloq import DAMPING
from workers.entry_format import CALIBRATED_METHODS
from workers.matrix_worker import MatrixJob, MatrixWorker
from workers.model_source import minilm_path
from workers.quant import QuantSpec
from workers.surgery import apply_quantized_base


def minilm_classifier() -> transformers.BertForSequenceClassification:
    return transformers.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)


def minilm_tensors() -> dict[str, torch.Tensor]:
    """The pretrained MiniLM-L6 encoder tensors, named as in its model.safetensors (no 'bert.' prefix)."""
    with safe_open(os.path.join(minilm_path(), "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def encoder_linears(model: transformers.BertForSequenceClassification) -> list[str]:
    """The 36 encoder linears that get quantized (the pooler stays full precision, as in every row)."""
    return [n for n, m in model.bert.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n]


def quantized_base(spec: QuantSpec, method: str, iters: int, rank: int,
                   grams: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """MiniLM's tensors with every encoder linear replaced by its quantized parts (and LoftQ factors if iters > 0).

    Deterministic (LoftQ's randomized SVD is seeded per matrix), so one base serves every seed of a row.
    A calibrated method (cloq) needs `grams`: each encoder linear's input Gram matrix (`minilm_grams`).
    """
    tensors = minilm_tensors()
    worker = MatrixWorker(torch.get_num_threads())
    damping = DAMPING if method in CALIBRATED_METHODS else None
    for name in encoder_linears(minilm_classifier()):
        job = MatrixJob(name, spec, rank, iters, method, damping=damping)
        gram = grams[name] if damping is not None else None
        tensors.update(worker.quantize(job, tensors.pop(name + ".weight"), gram).tensors)
    return tensors


def minilm_grams(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Each encoder linear's mean input Gram matrix over `texts`, on the full-precision MiniLM encoder."""
    model = minilm_classifier()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    return gather_grams(model.bert, tokenizer, texts, encoder_linears(model), max_length=max_length).grams


def classifier_on_base(tensors: dict[str, torch.Tensor], method: str, iters: int, rank: int) -> torch.nn.Module:
    """A fresh MiniLM classifier (new head, drawn from torch's global RNG) on a quantized base.

    LoftQ rows (iters > 0) start from the entry's factors rescaled to alpha / rank = 2 (each divided by
    sqrt(2), so 2 * B @ A is the LoftQ correction); QLoRA rows start from a Kaiming A and B = 0.
    Only the adapters and the classification head train.
    """
    model = minilm_classifier()
    apply_quantized_base(model, tensors, rank=rank, alpha=2 * rank, adapter="qalora" if method == "qalora" else "lora",
                         init="loftq" if iters > 0 else "qlora", prefix="bert.")
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith(("lora_A", "lora_B")) or name.startswith("classifier")
    return model


def quantized_classifier(spec: QuantSpec, method: str, iters: int, rank: int) -> torch.nn.Module:
    """MiniLM classifier whose 36 encoder linears are quantized (QLoRA, LoftQ or QA-LoRA start); head trainable."""
    return classifier_on_base(quantized_base(spec, method, iters, rank), method, iters, rank)


def quantized_model(spec: QuantSpec, rank: int) -> tuple[torch.nn.Module, int]:
    """The LoftQ (1 iteration) classifier and the bytes of its frozen quantized base."""
    model = quantized_classifier(spec, "loftq", 1, rank)
    frozen = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".q" in n)
    return model, frozen


def fp_lora_model(rank: int) -> tuple[torch.nn.Module, int]:
    from peft import LoraConfig, get_peft_model

    model = minilm_classifier()
    targets = encoder_linears(model)
    frozen = sum(m.weight.numel() * 2 for n, m in model.bert.named_modules() if n in targets)  # as fp16
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="SEQ_CLS")
    return get_peft_model(model, config), frozen


def step_fn(model: torch.nn.Module):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (16, 64), generator=gen)
    labels = torch.randint(0, 3, (16,), generator=gen)

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    baseline, fp16_bytes = fp_lora_model(args.rank)
    base_step = step_fn(baseline.train())
    print(f"{'quant':>9} {'fp_lora_ms':>10} {'q_lora_ms':>9} {'ratio':>6} {'frozen_MiB':>10} {'fp16_MiB':>8} "
          f"{'mem_ratio':>9}")
    for spec in (QuantSpec("nf", 2, 64), QuantSpec("nf", 4, 64), QuantSpec("int", 4, 64)):
        model, frozen = quantized_model(spec, args.rank)
        q_step = step_fn(model.train())
        for _ in range(3):  # warm-up
            base_step(), q_step()
        base_times, q_times = [], []
        for _ in range(args.steps):
            base_times.append(base_step())
            q_times.append(q_step())
        b, q = statistics.median(base_times) * 1e3, statistics.median(q_times) * 1e3
        print(f"{spec.name:>9} {b:10.1f} {q:9.1f} {q / b:6.2f} {frozen / 2**20:10.2f} {fp16_bytes / 2**20:8.2f} "
              f"{frozen / fp16_bytes:9.3f}", flush=True)


if __name__ == "__main__":
    main()
