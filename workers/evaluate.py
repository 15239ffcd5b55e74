"""Evaluation on a task's eval split, on every rank of a job: metrics by task type, greedy generation for
prompt_answer's exact match, and the metric names each reports (`eval_<name>`).

Every rank scores its shard of the eval split and the results are gathered, so the metrics are those of the
whole split whatever the world size.
"""

from __future__ import annotations

import torch

from workers.qlayers import weights_held
from workers.task_encoding import IGNORE_INDEX
from workers.trial_run import TrialRun


def quiet_generator() -> torch.Generator:
    """A DataLoader draws a seed from torch's global RNG for every pass unless given its own generator; the
    global RNG is dropout's, saved in checkpoints, so loaders must not touch it (or a resume would diverge)."""
    return torch.Generator().manual_seed(0)


@torch.no_grad()
def evaluate(run: TrialRun) -> dict:
    """Metrics on the eval split: every rank scores its shard, then predictions are gathered.

    prompt_answer adds `eval_exact_match`: greedy answers generated for the eval prompts.
    """
    run.engine.eval()
    try:
        metrics = _score_eval_split(run)
        if run.task.type == "prompt_answer":
            metrics["eval_exact_match"] = _exact_match(run)
    finally:
        run.engine.train()
    return metrics


def _score_eval_split(run: TrialRun) -> dict:
    """Classification / regression metrics from gathered logits, or the token loss and perplexity of an LM."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from workers.metrics import classification_metrics, perplexity, regression_metrics

    data, settings, world, task_type = run.data, run.settings, run.world, run.task.type
    sampler = DistributedSampler(data.eval, num_replicas=world, rank=run.rank, shuffle=False)
    loader = DataLoader(data.eval, batch_size=settings.micro_batch_size, sampler=sampler, collate_fn=data.collate,
                        generator=quiet_generator())
    outputs, labels, nll, tokens = [], [], 0.0, 0
    for i, batch in enumerate(loader):
        if settings.max_eval_batches is not None and i >= settings.max_eval_batches:
            break
        out = run.engine(**batch)
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


def _exact_match(run: TrialRun) -> float:
    """Exact match of greedy answers to the eval prompts, generated on every rank's shard and gathered.

    The shards are padded to equal sizes (DistributedSampler repeats a few prompts), so every rank makes the
    same number of generate calls; under ZeRO-3 `synced_gpus` also keeps each call's forward passes in step,
    since every forward gathers parameters from all ranks. Repeated prompts are counted once.
    """
    from torch.utils.data.distributed import DistributedSampler

    from workers.metrics import exact_match

    data, settings, world, tokenizer, engine = run.data, run.settings, run.world, run.tokenizer, run.engine
    indices = list(DistributedSampler(data.eval, num_replicas=world, rank=run.rank, shuffle=False))
    if settings.max_eval_batches is not None:
        indices = indices[: settings.max_eval_batches * settings.micro_batch_size]
    eos, pad = generation_token_ids(tokenizer)
    synced = world > 1 and engine.zero_optimization_stage() == 3
    answers = [generate_answers(engine.module, [prompt_ids(data.eval[i]) for i in chunk],
                                max_new_tokens=run.task.max_new_tokens, eos_id=eos, pad_id=pad, synced_gpus=synced)
               for chunk in _chunks(indices, settings.micro_batch_size)]
    local = torch.cat(answers) if answers else torch.empty(0, run.task.max_new_tokens, dtype=torch.long)
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
