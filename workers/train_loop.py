"""One fine-tuning job, as run by every Ray Train worker: a recipe, read top to bottom.

    base tensors (from the cache, via the object store) -> task model with quantized LoRA layers
    -> deepspeed.initialize (ZeRO 0-3, fp32 / bf16, AdamW, warmup + decay) -> steps (max_steps, or epochs)
    -> report every N steps, evaluate every M, checkpoint (safetensors + JSON) -> resume from the latest
    -> destroy the process group

The checkpoint format lives in workers/checkpoint.py, evaluation and generation in workers/evaluate.py.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from workers.checkpoint import load_checkpoint, save_checkpoint
from workers.entry_format import is_plain
from workers.evaluate import evaluate, quiet_generator
from workers.lm_loss import use_chunked_loss
from workers.malloc_tuning import pin_malloc_thresholds
from workers.model_files import write_tokenizer_files
from workers.qlayers import LORA_LAYERS
from workers.shared_tensors import from_shared
from workers.surgery import apply_quantized_base, empty_parameters, init_missing
from workers.train_settings import AdapterSettings, TrainSettings, deepspeed_config, lr_multiplier, with_epoch_steps
from workers.trial_run import TrialRun

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


def build_model(model_config: dict, tensors: dict[str, torch.Tensor], adapter: AdapterSettings, adapter_kind: str,
                num_labels: int | None, *, activation_checkpointing: bool = False) -> torch.nn.Module:
    """The task model with every target linear replaced by a quantized LoRA layer; only adapters and head train.

    The full-precision model is never materialized: the architecture is built with its parameters on the meta
    device, the targets become QuantLoraLinear layers over the entry's packed tensors, the entry's other tensors
    are loaded, and only what the entry lacks (a fresh task head) is allocated and initialized, as transformers
    initializes it. `num_labels` None builds a causal LM, else a sequence classifier with that many outputs;
    `adapter_kind` is "lora" or "qalora"; `activation_checkpointing` turns on transformers' (non-reentrant)
    checkpointing. The full-precision control's entry (bits 16: targets stored as `<module>.fpweight`, in bf16)
    gives FullPrecisionLoraLinear targets over those frozen weights instead: plain LoRA, the same everything else.
    """
    import transformers

    cfg = transformers.AutoConfig.for_model(**model_config)
    auto = transformers.AutoModelForCausalLM
    if num_labels is not None:
        cfg.num_labels = num_labels
        auto = transformers.AutoModelForSequenceClassification
    with empty_parameters():  # a 7B model would be 14-28 GB and minutes of random init, all replaced below
        model = auto.from_config(cfg)
    prefix = _entry_prefix(model, tensors)
    apply_quantized_base(model, tensors, rank=adapter.rank, alpha=adapter.alpha, adapter=adapter_kind,
                         dropout=adapter.dropout, init=adapter.init, prefix=prefix)
    init_missing(model)
    from_entry = {prefix + k for k in tensors}
    adapters = {id(p) for m in model.modules() if isinstance(m, LORA_LAYERS) for p in m.adapter_params()}
    for name, param in model.named_parameters():
        # adapters train; so does anything the entry does not hold (a fresh task head)
        param.requires_grad = id(param) in adapters or name not in from_entry
    if activation_checkpointing:
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
    model = build_model(job.model_config, from_shared(ray.get(job.base_ref)), job.adapter, job.adapter_kind,
                        num_labels, activation_checkpointing=settings.activation_checkpointing)  # object-store views
    if settings.activation_checkpointing:  # memory first: the peak without fragmentation or the full logits
        pin_malloc_thresholds()
    if num_labels is None:  # the head and loss over the scored tokens only, one chunk at a time if checkpointing
        use_chunked_loss(model, recompute=settings.activation_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(settings, step))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(settings))
    run = TrialRun(engine, scheduler, data, tokenizer, job.task, settings, rank, world)
    step, saved_metrics = _resume(engine, scheduler, job.resume_from)
    if step >= settings.max_steps:
        # a run restarted after its final checkpoint: report what it finished with (again as the latest
        # checkpoint, which is what a Result holds), so a Tune trial that missed the final report records it
        _report_checkpoint(run, step, {**saved_metrics, "max_steps": settings.max_steps}, step)
    else:
        _train(run, step)
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
        write_tokenizer_files(job.tokenizer_files, folder)
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


def _train(run: TrialRun, step: int) -> None:
    """Optimizer steps from `step` to settings.max_steps, with reports, evaluations and checkpoints."""
    import ray.train

    engine, settings, world = run.engine, run.settings, run.world
    resumed_from = step
    loader = _loader(run.data.train, run.data.collate, settings, run.rank, world, epoch_seed=settings.seed)
    if len(loader) == 0:  # every batch would be dropped as incomplete, and the loop would wait forever
        raise ValueError(f"training: the train split has {len(run.data.train)} examples, fewer than "
                         f"micro_batch_size ({settings.micro_batch_size}) x {world} workers; lower micro_batch_size")
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
            metrics.update(evaluate(run))
        if step % settings.report_every == 0 or metrics:
            elapsed = time.perf_counter() - window_start
            metrics.update(step=step, max_steps=settings.max_steps, resumed_from=resumed_from,
                           loss=window_loss / max(window_n, 1), lr=run.scheduler.get_last_lr()[0],
                           samples_per_s=window_n * settings.micro_batch_size * world / max(elapsed, 1e-9),
                           worker_peak_rss_mib=peak_rss_mib())
            window_start, window_loss, window_n = time.perf_counter(), 0.0, 0
        if step % settings.checkpoint_every == 0 or last:
            _report_checkpoint(run, step, metrics, resumed_from)
        elif metrics:
            ray.train.report(metrics)


def peak_rss_mib() -> float | None:
    """This worker's peak resident memory so far (VmHWM, Linux), in MiB: what a node must hold for it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _report_checkpoint(run: TrialRun, step: int, metrics: dict, resumed_from: int) -> None:
    """Save a checkpoint on every rank and report it with the metrics (all ranks must call this)."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, run.engine, _checkpoint_state(step, metrics, run.data))
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
                      drop_last=True, generator=quiet_generator())


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
