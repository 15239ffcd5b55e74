"""One fine-tuning job, as run by every Ray Train worker: a recipe, read top to bottom.

    base tensors (from the cache, via the object store) -> task model with quantized LoRA layers
    -> deepspeed.initialize (ZeRO 0-3, fp32 / bf16, AdamW, warmup + decay) -> steps (max_steps, or epochs)
    -> report every N steps, evaluate every M, checkpoint (safetensors + JSON) -> resume from the latest
    -> destroy the process group

A checkpoint is one directory that every rank writes into (Ray Train merges the ranks' files):

    trainable.safetensors            rank 0: the trainable tensors (adapters, task head), gathered under ZeRO-3
    state.json                       rank 0: step and metrics
    optim-rank00000.safetensors ...  every rank: its optimizer partition (the fp32 master parameters and the
                                     AdamW moments that DeepSpeed's inner torch optimizer holds on that rank)
                                     and its RNG state, with a JSON header (world size, ZeRO stage, precision)

Nothing is pickled: checkpoints may sit on shared storage. Resuming restores all of it, so a resumed run
continues exactly as an uninterrupted one; when the world size changed, the optimizer partitions no longer
fit and the run continues with fresh moments (logged), as it does from a checkpoint without them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workers.qlayers import weights_held
from workers.shared_tensors import from_shared
from workers.surgery import apply_quantized_base, empty_parameters, init_missing, is_plain
from workers.train_settings import AdapterSettings, TrainSettings, deepspeed_config, lr_multiplier, with_epoch_steps

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optim-rank{rank:05d}.safetensors"
OPTIMIZER_FORMAT = 1
IGNORE_INDEX = -100  # workers.tasks.IGNORE_INDEX: label of prompt and padding tokens

log = logging.getLogger(__name__)


@dataclass
class JobConfig:
    """Everything one fine-tuning job needs; built by the orchestrator, passed to every worker."""

    model_config: dict  # the base model's config.json
    base_ref: object  # ray.ObjectRef of the cache entry's tensors (workers.shared_tensors.to_shared of them)
    adapter_kind: str  # "lora" | "qalora"
    adapter: AdapterSettings
    training: TrainSettings
    task: object  # workers.tasks.TaskSpec
    tokenizer_dir: str  # read when the entry carries no tokenizer (entries built before they did)
    threads_per_worker: int = 1
    resume_from: str | None = None  # a checkpoint directory to start from when Ray Train has none
    tokenizer_files: dict[str, bytes] | None = None  # the cache entry's tokenizer (JSON files): used when given


# ----------------------------------------------------------------------------------------------- model


def build_model(job: JobConfig, tensors: dict[str, torch.Tensor], num_labels: int | None) -> torch.nn.Module:
    """The task model with every target linear replaced by a quantized LoRA layer; only adapters and head train.

    The full-precision model is never materialized: the architecture is built with its parameters on the meta
    device, the targets become QuantLoraLinear layers over the entry's packed tensors, the entry's other tensors
    are loaded, and only what the entry lacks (a fresh task head) is allocated and initialized, as transformers
    initializes it. `job.training.activation_checkpointing` turns on transformers' (non-reentrant) checkpointing.
    """
    import transformers

    cfg = transformers.AutoConfig.for_model(**job.model_config)
    auto = transformers.AutoModelForCausalLM
    if num_labels is not None:
        cfg.num_labels = num_labels
        auto = transformers.AutoModelForSequenceClassification
    with empty_parameters():  # a 7B model would be 14-28 GB and minutes of random init, all replaced below
        model = auto.from_config(cfg)
    prefix = _entry_prefix(model, tensors)
    apply_quantized_base(model, tensors, rank=job.adapter.rank, alpha=job.adapter.alpha, adapter=job.adapter_kind,
                         dropout=job.adapter.dropout, init=job.adapter.init, prefix=prefix)
    init_missing(model)
    from_entry = {prefix + k for k in tensors}
    for name, param in model.named_parameters():
        # adapters train; so does anything the entry does not hold (a fresh task head)
        param.requires_grad = name.endswith(("lora_A", "lora_B")) or name not in from_entry
    if job.training.activation_checkpointing:
        # non-reentrant: reentrant checkpointing drops the gradients of a block whose input needs none (the
        # frozen embeddings' output); the recomputation also replays dropout's RNG, so gradients are unchanged
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _entry_prefix(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """'' or '<base_model_prefix>.': whichever maps more of the entry's tensor names onto the model."""
    names = set(model.state_dict())
    candidates = ["", getattr(model, "base_model_prefix", "") + "."]
    plain = [k for k in tensors if is_plain(k)]
    return max(candidates, key=lambda p: sum(p + k in names for k in plain))


# ----------------------------------------------------------------------------------------------- checkpoints


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """The trainable tensors, gathered from ZeRO-3 partitions on every rank (all ranks must call this)."""
    import deepspeed

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().float().cpu().clone().contiguous() for n, p in params.items()}


def save_checkpoint(directory: str, engine, state: dict) -> None:
    """Write this rank's part of a checkpoint into `directory` (all ranks must call this).

    Rank 0 writes the trainable tensors and the counters; every rank writes its optimizer partition.
    """
    tensors = trainable_state(engine)
    if engine.global_rank == 0:
        save_file(tensors, os.path.join(directory, TRAINABLE_FILE))
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f)
    save_optimizer_partition(directory, engine)


def load_checkpoint(directory: str, engine) -> dict:
    """Restore trainable tensors (into every rank's partition), the optimizer, and return the saved counters.

    The returned dict is state.json plus `optimizer_restored` (False: fresh moments, see the log).
    """
    import deepspeed

    saved = load_file(os.path.join(directory, TRAINABLE_FILE))
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for name, param in params.items():
            param.data.copy_(saved[name].to(param.dtype))
    # ZeRO 1-3 and bf16 keep fp32 master copies that the next step would copy back over the parameters:
    # point them at the restored values even when the optimizer partition cannot be loaded below.
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    state["optimizer_restored"] = load_optimizer_partition(directory, engine)
    return state


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer whose parameters are this rank's fp32 (master) tensors and whose state is AdamW's.

    Under ZeRO 1-3 and bf16, DeepSpeed wraps the AdamW it was given and hands it flattened fp32 partitions;
    at ZeRO 0 in fp32 the engine steps the AdamW itself over the model's parameters.
    """
    wrapper = engine.optimizer
    return wrapper.optimizer if hasattr(wrapper, "optimizer") else wrapper


def _layout(engine) -> dict:
    """What an optimizer partition depends on: it only fits an engine with the same layout."""
    return {"world_size": engine.world_size, "zero_stage": engine.zero_optimization_stage(),
            "precision": "bf16" if engine.bfloat16_enabled() else "fp32"}


def partition_params(engine) -> list[torch.Tensor]:
    """This rank's fp32 (master) tensors that the inner optimizer steps, in a fixed order; its state is keyed by them.

    ZeRO-3 hands its flat fp32 partitions to the optimizer one sub-group at a time (its param groups are empty
    between steps), so they are listed from the ZeRO-3 optimizer itself.
    """
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for group in inner_optimizer(engine).param_groups for p in group["params"]]


def save_optimizer_partition(directory: str, engine) -> str:
    """Write this rank's optimizer partition and RNG state as safetensors (layout in its JSON header)."""
    optimizer, params = inner_optimizer(engine), partition_params(engine)
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    scalars = {}  # non-tensor state values (none for torch's AdamW, whose step is a tensor)
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"state.{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()  # dropout masks continue as in an uninterrupted run
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    header = {"format": OPTIMIZER_FORMAT, "rank": engine.global_rank, **_layout(engine), "scalars": scalars}
    path = os.path.join(directory, OPTIMIZER_FILE.format(rank=engine.global_rank))
    save_file(tensors, path, metadata={"loftune": json.dumps(header)})
    return path


def _read_header(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("loftune", "null"))


def _partition_source(directory: str, engine) -> tuple[str | None, dict, str]:
    """The optimizer file this rank can load and its header, or None, {} and the reason why not."""
    layout = _layout(engine)
    own = os.path.join(directory, OPTIMIZER_FILE.format(rank=engine.global_rank))
    header = _read_header(own)
    if header is not None and all(header.get(k) == v for k, v in layout.items()):
        return own, header, ""
    first = os.path.join(directory, OPTIMIZER_FILE.format(rank=0))
    header0 = _read_header(first)
    if header0 is None:
        return None, {}, "the checkpoint has no optimizer state"
    if layout["zero_stage"] == 0 and header0["zero_stage"] == 0 and header0["precision"] == layout["precision"]:
        return first, header0, ""  # ZeRO 0 replicates the optimizer on every rank: any copy fits any world size
    saved = {k: header0.get(k) for k in layout}
    return None, {}, f"it was saved with {saved}, this run is {layout}"


def load_optimizer_partition(directory: str, engine) -> bool:
    """Load this rank's optimizer partition (master parameters, moments) and RNG state; False if it cannot.

    A partition fits only the world size, ZeRO stage and precision it was saved with (ZeRO 0 state is not
    partitioned and fits any world size). Otherwise the optimizer keeps its fresh state, with a warning.
    """
    source, header, why = _partition_source(directory, engine)
    params = partition_params(engine)
    saved = load_file(source) if source else {}
    shapes = [saved[f"param.{i}"].shape for i in range(sum(k.startswith("param.") for k in saved))]
    if source and shapes != [p.shape for p in params]:
        source, why = None, "its partition shapes differ from this run's"
    if source is None:
        log.warning("rank %d: not restoring the optimizer state (%s); continuing with fresh AdamW moments",
                    engine.global_rank, why)
        return False
    optimizer, state = inner_optimizer(engine), _unflatten_state(saved, header["scalars"])
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[f"param.{i}"])
            if i in state:  # torch keeps AdamW's step count on the CPU, the moments beside their parameter
                optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and k != "step" else v
                                      for k, v in state[i].items()}
    if source.endswith(OPTIMIZER_FILE.format(rank=engine.global_rank)):  # this rank's own RNG stream
        torch.set_rng_state(saved["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda" in saved:
            torch.cuda.set_rng_state(saved["rng.cuda"])
    return True


def _unflatten_state(saved: dict[str, torch.Tensor], scalars: dict) -> dict[int, dict]:
    """{'state.3.exp_avg': t, ...} and {'3.foo': 1.0} -> {3: {'exp_avg': t, 'foo': 1.0}}, by parameter position."""
    state: dict[int, dict] = {}
    for name, tensor in saved.items():
        if name.startswith("state."):
            index, key = name[len("state."):].split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
    for name, value in scalars.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return state


# ----------------------------------------------------------------------------------------------- training


def train_func(config: dict) -> None:
    """Ray Train entry point: `config["job"]` is a JobConfig."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: gloo, no CUDA probing
    import deepspeed
    import ray
    import ray.train

    from workers.tasks import load_task

    job: JobConfig = config["job"]
    torch.set_num_threads(job.threads_per_worker)
    torch.manual_seed(job.training.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    tokenizer = load_tokenizer(job)
    data = load_task(job.task, tokenizer)
    settings = with_epoch_steps(job.training, len(data.train), world)  # max_steps from epochs, if given
    num_labels = {"classification": data.num_labels, "regression": 1}.get(job.task.type)
    model = build_model(job, from_shared(ray.get(job.base_ref)), num_labels)  # views of the object store
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(settings, step))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(settings))
    step, saved_metrics = _resume(engine, scheduler, job.resume_from)
    if step >= settings.max_steps:
        # a run restarted after its final checkpoint: report what it finished with (again as the latest
        # checkpoint, which is what a Result holds), so a Tune trial that missed the final report records it
        _report_checkpoint(engine, step, {**saved_metrics, "max_steps": settings.max_steps}, step, data)
    else:
        _train(engine, scheduler, data, tokenizer, job, settings, step, rank, world)
    # Ray Train destroys the group only for multi-worker groups; an undestroyed group made one run in three
    # abort at exit. Every collective is done: the last report above is a barrier across workers.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def load_tokenizer(job: JobConfig):
    """The entry's own tokenizer (its JSON files written to a private temporary folder), so that a cache that was
    copied or mounted elsewhere works on any host; else the tokenizer at `tokenizer_dir`."""
    import transformers

    if not job.tokenizer_files:
        return transformers.AutoTokenizer.from_pretrained(job.tokenizer_dir)
    with tempfile.TemporaryDirectory() as folder:
        for name, data in job.tokenizer_files.items():
            if os.path.basename(name) != name or not name.endswith(".json"):
                raise ValueError(f"tokenizer file {name!r}: expected a plain *.json file name")
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        return transformers.AutoTokenizer.from_pretrained(folder)


def _resume(engine, scheduler, resume_from: str | None) -> tuple[int, dict]:
    """Restore the latest checkpoint (Ray Train's after a restart, else `resume_from`).

    Returns the step to continue at and the metrics saved with that checkpoint.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from is None:
        return 0, {}
    if checkpoint is not None:  # a restarted worker group: continue from the latest checkpoint, not from step 0
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, engine)
    else:
        state = load_checkpoint(resume_from, engine)
    for _ in range(state["step"]):
        scheduler.step()
    return state["step"], state.get("metrics", {})


def _train(engine, scheduler, data, tokenizer, job: JobConfig, settings: TrainSettings, step: int, rank: int,
           world: int) -> None:
    """Optimizer steps from `step` to settings.max_steps, with reports, evaluations and checkpoints."""
    import ray.train

    resumed_from = step
    loader = _loader(data.train, data.collate, settings, rank, world, epoch_seed=settings.seed)
    if len(loader) == 0:  # every batch would be dropped as incomplete, and the loop would wait forever
        raise ValueError(f"training: the train split has {len(data.train)} examples, fewer than micro_batch_size "
                         f"({settings.micro_batch_size}) x {world} workers; lower micro_batch_size")
    batches = _batches_from(loader, step * settings.grad_accum)
    window_start, window_loss, window_n = time.perf_counter(), 0.0, 0
    while step < settings.max_steps:
        engine.train()
        for _ in range(settings.grad_accum):
            loss = engine(**next(batches)).loss
            engine.backward(loss)
            engine.step()
            window_loss += loss.item()
            window_n += 1
        step += 1
        last = step == settings.max_steps
        metrics = {}
        if step % settings.eval_every == 0 or last:
            metrics.update(evaluate(engine, data, job.task, settings, rank, world, tokenizer))
        if step % settings.report_every == 0 or metrics:
            elapsed = time.perf_counter() - window_start
            metrics.update(step=step, max_steps=settings.max_steps, resumed_from=resumed_from,
                           loss=window_loss / max(window_n, 1), lr=scheduler.get_last_lr()[0],
                           samples_per_s=window_n * settings.micro_batch_size * world / max(elapsed, 1e-9),
                           worker_peak_rss_mib=peak_rss_mib())
            window_start, window_loss, window_n = time.perf_counter(), 0.0, 0
        if step % settings.checkpoint_every == 0 or last:
            _report_checkpoint(engine, step, metrics, resumed_from, data)
        elif metrics:
            ray.train.report(metrics)


def peak_rss_mib() -> float | None:
    """This worker's peak resident memory so far (VmHWM, Linux), in MiB: what a node must hold for it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _report_checkpoint(engine, step: int, metrics: dict, resumed_from: int, data) -> None:
    """Save a checkpoint on every rank and report it with the metrics (all ranks must call this)."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, engine, _checkpoint_state(step, metrics, data))
        torch.distributed.barrier()
        # every rank reports its own files (its optimizer partition); Ray Train merges them into one
        ray.train.report({**metrics, "step": step, "resumed_from": resumed_from},
                         checkpoint=Checkpoint.from_directory(directory))


def _checkpoint_state(step: int, metrics: dict, data) -> dict:
    """state.json: the step to resume at, the metrics, and the task head's size for exports (not for LMs)."""
    state = {"step": step, "metrics": metrics}
    if data.num_labels is not None:
        state["num_labels"] = data.num_labels
    return state


def _loader(dataset, collate, settings: TrainSettings, rank: int, world: int, epoch_seed: int):
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=epoch_seed)
    return DataLoader(dataset, batch_size=settings.micro_batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=True, generator=_quiet_generator())


def _quiet_generator() -> torch.Generator:
    """A DataLoader draws a seed from torch's global RNG for every pass unless given its own generator; the
    global RNG is dropout's, saved in checkpoints, so loaders must not touch it (or a resume would diverge)."""
    return torch.Generator().manual_seed(0)


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


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(engine, data, task, settings: TrainSettings, rank: int, world: int, tokenizer=None) -> dict:
    """Metrics on the eval split: every rank scores its shard, then predictions are gathered.

    prompt_answer adds `eval_exact_match`: greedy answers generated for the eval prompts (needs `tokenizer`).
    """
    engine.eval()
    try:
        metrics = _score_eval_split(engine, data, task.type, settings, rank, world)
        if task.type == "prompt_answer":
            metrics["eval_exact_match"] = _exact_match(engine, data, task, settings, rank, world, tokenizer)
    finally:
        engine.train()
    return metrics


def _score_eval_split(engine, data, task_type: str, settings: TrainSettings, rank: int, world: int) -> dict:
    """Classification / regression metrics from gathered logits, or the token loss and perplexity of an LM."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from workers.metrics import classification_metrics, perplexity, regression_metrics

    sampler = DistributedSampler(data.eval, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data.eval, batch_size=settings.micro_batch_size, sampler=sampler, collate_fn=data.collate,
                        generator=_quiet_generator())
    outputs, labels, nll, tokens = [], [], 0.0, 0
    for i, batch in enumerate(loader):
        if settings.max_eval_batches is not None and i >= settings.max_eval_batches:
            break
        out = engine(**batch)
        if task_type in ("classification", "regression"):
            outputs.append(out.logits.float())
            labels.append(batch["labels"])
        else:
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            nll, tokens = nll + out.loss.item() * n, tokens + n
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


def _exact_match(engine, data, task, settings: TrainSettings, rank: int, world: int, tokenizer) -> float:
    """Exact match of greedy answers to the eval prompts, generated on every rank's shard and gathered.

    The shards are padded to equal sizes (DistributedSampler repeats a few prompts), so every rank makes the
    same number of generate calls; under ZeRO-3 `synced_gpus` also keeps each call's forward passes in step,
    since every forward gathers parameters from all ranks. Repeated prompts are counted once.
    """
    from torch.utils.data.distributed import DistributedSampler

    from workers.metrics import exact_match

    indices = list(DistributedSampler(data.eval, num_replicas=world, rank=rank, shuffle=False))
    if settings.max_eval_batches is not None:
        indices = indices[: settings.max_eval_batches * settings.micro_batch_size]
    eos, pad = generation_token_ids(tokenizer)
    synced = world > 1 and engine.zero_optimization_stage() == 3
    answers = [generate_answers(engine.module, [prompt_ids(data.eval[i]) for i in chunk],
                                max_new_tokens=task.max_new_tokens, eos_id=eos, pad_id=pad, synced_gpus=synced)
               for chunk in _chunks(indices, settings.micro_batch_size)]
    local = torch.cat(answers) if answers else torch.empty(0, task.max_new_tokens, dtype=torch.long)
    gathered, order = _gather(local, world), _gather(torch.tensor(indices, dtype=torch.long), world)
    first = {}  # dataset index -> row of `gathered`, the first time it occurs
    for row, index in enumerate(order.tolist()):
        first.setdefault(index, row)
    predictions = [decode_answer(tokenizer, gathered[row], eos) for row in first.values()]
    return exact_match(predictions, [data.eval_answers[i] for i in first])


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def prompt_ids(row: dict) -> list[int]:
    """The prompt of a tokenized prompt_answer row: the tokens before the first one with a label."""
    labels = row["labels"]
    return row["input_ids"][: next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))]


def generation_token_ids(tokenizer) -> tuple[int | None, int]:
    """(end, pad) token ids for generation: the end token is the one prompt_answer rows are trained to end with."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = next((t for t in (tokenizer.pad_token_id, eos) if t is not None), 0)
    return eos, pad


def generate_answers(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None, pad_id: int,
                     synced_gpus: bool = False) -> torch.Tensor:
    """Greedy continuations of `prompts` as token ids [len(prompts), max_new_tokens], -1 after each one ends.

    Prompts are left-padded into one batch, so every continuation starts right after its own prompt. The
    fixed width lets ranks all_gather their answers.
    """
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    dtype = model.get_input_embeddings().weight.dtype  # what the layers' inputs are computed in
    with weights_held(model, dtype):  # a forward per token: dequantize each layer once per call, not per token
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id,
                             synced_gpus=synced_gpus)
    new = out[:, width:].cpu()
    answers = torch.full((len(prompts), max_new_tokens), -1, dtype=torch.long)
    answers[:, : new.shape[1]] = new
    if eos_id is not None:  # what follows the end token is padding
        ended = (answers == eos_id).long().cumsum(dim=1) > 0
        answers[ended & (answers != eos_id)] = -1
    return answers


def decode_answer(tokenizer, answer: torch.Tensor, eos_id: int | None) -> str:
    """Text of one generated answer: the tokens before its end token, special tokens dropped."""
    ids = [t for t in answer.tolist() if t >= 0]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)

