"""Training peak memory and step time at LLM scale: loftune's quantized LoRA beside the tools a user would pick.

    python -m bench.bench_memory                       # every configuration x shape (about 20 minutes)
    python -m bench.bench_memory --shapes 7b-1x256 --configs peft-bf16,loftune-nf4

Rows, each in a fresh process (so one row's allocations never lower the next one's peak):
- `peft-bf16`: peft LoRA r16 on every linear of the bf16 model (the full-precision baseline);
- `bnb-nf4`: peft + bitsandbytes NF4 QLoRA (its CPU path; bf16 compute), the tool a user would pick instead;
- `loftune-nf4`, `loftune-nf2`: loftune's packed NF4 / NF2 base (group 64) with r16 adapters, built the way a
  training worker builds it (`workers.train_loop.build_model` from the entry's tensors) and with the loss a
  worker uses for causal LMs (`workers.lm_loss`: head and cross-entropy over token chunks, no full logits);
- `-ckpt` variants: the same with activation checkpointing (transformers', non-reentrant); loftune's then also
  recomputes the loss chunks and pins glibc's malloc thresholds (`workers/malloc_tuning.py`), as its workers do.

Shapes: LLaMA-2-7B-shaped blocks (hidden 4096, MLP 11008, 32 heads, vocab 32000; 4 blocks) at micro-batch 1 x 256
and 4 x 256 tokens, and the LLaMA-shaped model of BENCHMARKS.md section 2 (8 blocks of hidden 2048, MLP 5504) at
4 x 256. Weights are random (seeded) and written once as a bf16 safetensors model under ~/.cache/loftune-bench;
the quantized bases are made from them once too.

Per row: the resident set before the first step, the training peak (the high-water mark reset through
/proc/self/clear_refs after the model is built, read from VmHWM after the steps), the bytes autograd keeps for
backward beyond the model's own parameters and buffers (saved_tensors_hooks over one step), and the median step
time (forward, backward, AdamW) after a warm-up step. 2 torch threads, as a training worker of 2 CPUs has.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CACHE = os.path.expanduser(os.environ.get("LOFTUNE_BENCH_CACHE", "~/.cache/loftune-bench"))
SHAPES = {
    "7b-1x256": dict(hidden=4096, mlp=11008, heads=32, layers=4, vocab=32000, batch=1, seq=256),
    "7b-4x256": dict(hidden=4096, mlp=11008, heads=32, layers=4, vocab=32000, batch=4, seq=256),
    "2048x8-4x256": dict(hidden=2048, mlp=5504, heads=16, layers=8, vocab=32000, batch=4, seq=256),
}
CONFIGS = ("peft-bf16", "peft-bf16-ckpt", "bnb-nf4", "loftune-nf4", "loftune-nf2", "loftune-nf4-ckpt",
           "loftune-nf2-ckpt")
RANK, ALPHA, STEPS = 16, 32, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ measuring


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def saved_bytes(model, step) -> int:
    """Bytes autograd keeps for backward in one step, beyond the model's own parameters and buffers."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------ models


def model_dir(shape: str) -> str:
    """A LLaMA-shaped bf16 model with seeded random weights, written once."""
    import torch
    import transformers

    s = SHAPES[shape]
    path = os.path.join(CACHE, f"llama-h{s['hidden']}-m{s['mlp']}-l{s['layers']}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cfg = transformers.LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                                   num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                                   vocab_size=s["vocab"], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path + ".tmp", safe_serialization=True)
    os.replace(path + ".tmp", path)
    return path


def entry_tensors(shape: str, bits: int) -> str:
    """The model's tensors with every block linear quantized (NF-bits, group 64), as a cache entry holds them."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from workers.matrix_worker import MatrixJob, MatrixWorker
    from workers.quant import QuantSpec

    path = os.path.join(CACHE, f"{os.path.basename(model_dir(shape))}-nf{bits}.safetensors")
    if os.path.isfile(path):
        return path
    worker, tensors = MatrixWorker(torch.get_num_threads()), {}
    with safe_open(os.path.join(model_dir(shape), "model.safetensors"), "pt") as f:
        for name in f.keys():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
                job = MatrixJob(module, QuantSpec("nf", bits, 64), RANK, 0, "qlora")
                tensors.update(worker.quantize(job, f.get_tensor(name).float()).tensors)
            else:
                tensors[name] = f.get_tensor(name)
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def build(config: str, shape: str):
    """The model of one row, ready to train (only its adapters require grad)."""
    import peft
    import torch
    import transformers

    path = model_dir(shape)
    if config.startswith("peft"):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif config == "bnb-nf4":
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu",
                                                                  dtype=torch.bfloat16)
    else:
        return _loftune_model(path, shape, int(config.split("nf")[1][0]), checkpointing=config.endswith("-ckpt"))
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


def _loftune_model(path: str, shape: str, bits: int, checkpointing: bool):
    import torch
    from safetensors.torch import load_file

    from workers.lm_loss import use_chunked_loss
    from workers.train_loop import build_model
    from workers.train_settings import AdapterSettings

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = build_model(config, load_file(entry_tensors(shape, bits)),
                        AdapterSettings(rank=RANK, alpha=ALPHA, init="qlora"), "lora", None)
    use_chunked_loss(model, recompute=checkpointing)  # as a training worker does for causal LMs (workers/lm_loss.py)
    return model.to(torch.bfloat16)  # the non-quantized tensors and adapters in bf16, as DeepSpeed's bf16 mode


# ------------------------------------------------------------------------------------------ one row


def measure(config: str, shape: str) -> dict:
    """Build, then train STEPS steps and measure (run in a fresh process)."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    threshold_mib = float(os.environ.get("BENCH_MALLOC_THRESHOLD_MIB", "-1"))  # -1: what a worker does; 0: off
    if config.startswith("loftune") and config.endswith("-ckpt") and threshold_mib != 0:
        from workers.malloc_tuning import THRESHOLD_BYTES, pin_malloc_thresholds

        # as a training worker does (workers/train_loop.py)
        pin_malloc_thresholds(THRESHOLD_BYTES if threshold_mib < 0 else int(threshold_mib * 2**20))
    s = SHAPES[shape]
    model = build(config, shape)
    if config.endswith("-ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    resident = _status("VmRSS")
    reset_peak()
    times = []
    for i in range(STEPS):
        start = time.perf_counter()
        if i == 1:
            kept = saved_bytes(model, step)
        else:
            step()
        times.append(time.perf_counter() - start)
    peak = _status("VmHWM")
    return {"config": config, "shape": shape, "resident_mib": resident / 2**20, "peak_mib": peak / 2**20,
            "peak_minus_resident_mib": (peak - resident) / 2**20, "saved_for_backward_mib": kept / 2**20,
            "step_s": statistics.median(times[1:]), "trainable_params": sum(p.numel() for p in trainable)}


# ------------------------------------------------------------------------------------------ the table


def run_row(config: str, shape: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "bench.bench_memory", "--one", config, "--shapes", shape],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"config": config, "shape": shape, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':<13} {'config':<17} {'resident':>9} {'peak':>8} {'peak-res':>9} {'saved':>8} {'step_s':>7} "
             f"{'peak/peft':>9} {'step/peft':>9} {'step/bnb':>8}"]
    base = {(r["shape"]): r for r in rows if r["config"] == "peft-bf16" and "error" not in r}
    bnb = {(r["shape"]): r for r in rows if r["config"] == "bnb-nf4" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:<13} {r['config']:<17} failed: {r['error']}")
            continue
        b, q = base.get(r["shape"]), bnb.get(r["shape"])
        ratio = f"{r['peak_mib'] / b['peak_mib']:9.2f}" if b else f"{'-':>9}"
        step = f"{r['step_s'] / b['step_s']:9.2f}" if b else f"{'-':>9}"
        vs_bnb = f"{r['step_s'] / q['step_s']:8.2f}" if q else f"{'-':>8}"
        lines.append(f"{r['shape']:<13} {r['config']:<17} {r['resident_mib']:9.0f} {r['peak_mib']:8.0f} "
                     f"{r['peak_minus_resident_mib']:9.0f} {r['saved_for_backward_mib']:8.0f} {r['step_s']:7.2f} "
                     f"{ratio} {step} {vs_bnb}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one row in this process
    parser.add_argument("--json", default="bench/results-memory.json")
    args = parser.parse_args()
    shapes, configs = args.shapes.split(","), args.configs.split(",")
    if args.one:
        print(json.dumps(measure(args.one, shapes[0])))
        return
    for shape in shapes:  # prepare once, outside the measured processes
        model_dir(shape)
        if any(c.startswith("loftune") for c in configs):
            for bits in sorted({int(c.split("nf")[1][0]) for c in configs if c.startswith("loftune")}):
                entry_tensors(shape, bits)
    rows = []
    for shape in shapes:
        for config in configs:
            rows.append(run_row(config, shape))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    with open(args.json, "w") as f:
        json.dump({"uptime": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
