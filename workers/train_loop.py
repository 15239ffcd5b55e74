"""One fine-tuning job, as run by every Ray Train worker: a recipe, read top to bottom.

    base tensors (from the cache, via the object store) -> task model with quantized LoRA layers
    -> deepspeed.initialize (ZeRO 0-3, fp32 / bf16, AdamW, warmup + decay) -> steps
    -> report every N steps, evaluate every M, checkpoint (safetensors + JSON) -> resume from the latest

Checkpoints hold the trainable tensors (adapters and the task head) as safetensors and the counters as
JSON: nothing is pickled. Under ZeRO-3 the trainable parameters are gathered on every rank before saving.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from workers.surgery import apply_quantized_base, is_plain
from workers.train_settings import AdapterSettings, TrainSettings, deepspeed_config, lr_multiplier

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"


@dataclass
class JobConfig:
    """Everything one fine-tuning job needs; built by the orchestrator, passed to every worker."""

    model_config: dict  # the base model's config.json
    base_ref: object  # ray.ObjectRef of the cache entry's tensors (dict[str, Tensor])
    adapter_kind: str  # "lora" | "qalora"
    adapter: AdapterSettings
    training: TrainSettings
    task: object  # workers.tasks.TaskSpec
    tokenizer_dir: str
    threads_per_worker: int = 1


def build_model(job: JobConfig, tensors: dict[str, torch.Tensor], num_labels: int | None) -> torch.nn.Module:
    """The task model with every target linear replaced by a quantized LoRA layer; only adapters and head train."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**job.model_config)
    if num_labels is not None:
        cfg.num_labels = num_labels
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    prefix = _entry_prefix(model, tensors)
    apply_quantized_base(model, tensors, rank=job.adapter.rank, alpha=job.adapter.alpha, adapter=job.adapter_kind,
                         dropout=job.adapter.dropout, init=job.adapter.init, prefix=prefix)
    from_entry = {prefix + k for k in tensors}
    for name, param in model.named_parameters():
        # adapters train; so does anything the entry does not hold (a fresh task head)
        param.requires_grad = name.endswith(("lora_A", "lora_B")) or name not in from_entry
    return model


def _entry_prefix(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """'' or '<base_model_prefix>.': whichever maps more of the entry's tensor names onto the model."""
    names = set(model.state_dict())
    candidates = ["", getattr(model, "base_model_prefix", "") + "."]
    plain = [k for k in tensors if is_plain(k)]
    return max(candidates, key=lambda p: sum(p + k in names for k in plain))


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """The trainable tensors, gathered from ZeRO-3 partitions on every rank (all ranks must call this)."""
    import deepspeed

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().float().cpu().clone().contiguous() for n, p in params.items()}


def save_checkpoint(directory: str, engine, state: dict) -> None:
    tensors = trainable_state(engine)
    if engine.global_rank == 0:
        save_file(tensors, os.path.join(directory, TRAINABLE_FILE))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f)


def load_checkpoint(directory: str, engine) -> dict:
    """Restore trainable tensors (into every rank's partition) and return the saved counters."""
    import deepspeed

    saved = load_file(os.path.join(directory, TRAINABLE_FILE))
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for name, param in params.items():
            param.data.copy_(saved[name].to(param.dtype))
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def train_func(config: dict) -> None:
    """Ray Train entry point: `config["job"]` is a JobConfig."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: gloo, no CUDA probing
    import deepspeed
    import ray
    import ray.train
    from ray.train import Checkpoint

    from workers.tasks import load_task

    job: JobConfig = config["job"]
    torch.set_num_threads(job.threads_per_worker)
    settings = job.training
    torch.manual_seed(settings.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(job.tokenizer_dir)
    data = load_task(job.task, tokenizer)
    num_labels = {"classification": data.num_labels, "regression": 1}.get(job.task.type)
    model = build_model(job, ray.get(job.base_ref), num_labels)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(settings, step))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(settings))
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group: continue from the latest checkpoint, not from step 0
        with checkpoint.as_directory() as directory:
            step = load_checkpoint(directory, engine)["step"]
        for _ in range(step):
            scheduler.step()
    resumed_from = step

    loader = _loader(data.train, data.collate, settings, rank, world, epoch_seed=settings.seed)
    batches = _batches_from(loader, step * settings.grad_accum)
    window_start, window_loss, window_n = time.perf_counter(), 0.0, 0
    while step < settings.max_steps:
        engine.train()
        for _ in range(settings.grad_accum):
            batch = next(batches)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window_loss += loss.item()
            window_n += 1
        step += 1
        metrics = {}
        if step % settings.eval_every == 0 or step == settings.max_steps:
            metrics.update(evaluate(engine, data, job.task.type, settings, rank, world))
        if step % settings.report_every == 0 or metrics:
            elapsed = time.perf_counter() - window_start
            metrics.update(step=step, resumed_from=resumed_from, loss=window_loss / max(window_n, 1),
                           lr=scheduler.get_last_lr()[0],
                           samples_per_s=window_n * settings.micro_batch_size * world / max(elapsed, 1e-9))
            window_start, window_loss, window_n = time.perf_counter(), 0.0, 0
        if step % settings.checkpoint_every == 0 or step == settings.max_steps:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, engine, {"step": step, "metrics": metrics})
                torch.distributed.barrier()
                ckpt = Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report({**metrics, "step": step, "resumed_from": resumed_from}, checkpoint=ckpt)
        elif metrics:
            ray.train.report(metrics)


def _loader(dataset, collate, settings: TrainSettings, rank: int, world: int, epoch_seed: int):
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=epoch_seed)
    return DataLoader(dataset, batch_size=settings.micro_batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=True)


def _batches_from(loader, skip: int):
    """Endless batches over epochs (the sampler reshuffles per epoch), skipping those already trained on."""
    epoch, seen = 0, 0
    while True:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if seen >= skip:
                yield batch
            seen += 1
        epoch += 1


@torch.no_grad()
def evaluate(engine, data, task_type: str, settings: TrainSettings, rank: int, world: int) -> dict:
    """Metrics on the eval split: every rank scores its shard, then predictions are gathered."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from workers.metrics import classification_metrics, perplexity, regression_metrics

    engine.eval()
    sampler = DistributedSampler(data.eval, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data.eval, batch_size=settings.micro_batch_size, sampler=sampler, collate_fn=data.collate)
    outputs, labels, nll, tokens = [], [], 0.0, 0
    for i, batch in enumerate(loader):
        if settings.max_eval_batches is not None and i >= settings.max_eval_batches:
            break
        out = engine(**batch)
        if task_type in ("classification", "regression"):
            outputs.append(out.logits.float())
            labels.append(batch["labels"])
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll, tokens = nll + out.loss.item() * n, tokens + n
    engine.train()
    if task_type in ("classification", "regression"):
        logits, gold = _gather(torch.cat(outputs), world), _gather(torch.cat(labels), world)
        if task_type == "classification":
            return {f"eval_{k}": v for k, v in classification_metrics(logits, gold).items()}
        return {f"eval_{k}": v for k, v in regression_metrics(logits.squeeze(-1), gold).items()}
    totals = torch.tensor([nll, float(tokens)])
    if world > 1:
        torch.distributed.all_reduce(totals)
    mean_nll = (totals[0] / totals[1].clamp(min=1)).item()
    return {"eval_loss": mean_nll, "eval_perplexity": perplexity(mean_nll)}


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)
