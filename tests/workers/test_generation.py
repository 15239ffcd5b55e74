"""Greedy answer generation for prompt_answer tasks: a LoftQ NF2 tiny Llama, the real MiniLM tokenizer, in-process.

The distributed path (ZeRO-3, two workers, gathering) is tests/workers/test_train.py's; here the pieces it uses are
checked one process: prompts cut from the tokenized rows, left-padded batches, decoding up to the end token,
and an exact match that is 0 before training and 1 after memorizing the pairs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from workers.evaluate import decode_answer, generate_answers, generation_token_ids, prompt_ids
from workers.matrix_worker import MatrixJob, MatrixWorker
from workers.metrics import exact_match
from workers.model_source import materialize_tiny
from workers.quant import QuantSpec
from workers.tasks import TaskSpec, load_task
from workers.train_loop import build_model
from workers.train_settings import AdapterSettings

PAIRS = [("the capital of france", "paris"), ("the colour of grass", "green"), ("two plus two", "four"),
         ("the opposite of hot", "cold"), ("a baby cat is a", "kitten"), ("the sky at noon is", "blue"),
         ("ten minus three", "seven")]
MAX_NEW = 6


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in PAIRS))
    task = TaskSpec(name="qa", type="prompt_answer", train_file=str(path), eval_file=str(path),
                    max_new_tokens=MAX_NEW)
    return load_task(task, tokenizer)


def tiny_llama(root: str) -> torch.nn.Module:
    """The built-in tiny Llama with its linears LoftQ-quantized to NF2 (rank 4), as a training worker builds it."""
    source = materialize_tiny("tiny-llama", root)
    tensors = {}
    for file in source.files:
        tensors.update(load_file(os.path.join(source.path, file)))
    worker = MatrixWorker(1)
    for module in source.linear_modules:
        job = MatrixJob(module, QuantSpec("nf", 2, 64), rank=4, iters=2)
        tensors.update(worker.quantize(job, tensors.pop(module + ".weight")).tensors)
    with open(os.path.join(source.path, "config.json")) as f:
        config = json.load(f)
    torch.manual_seed(0)
    return build_model(config, tensors, AdapterSettings(rank=4, alpha=8), "lora", num_labels=None)


def answers(model, data, tokenizer, rows: list[int] | None = None) -> torch.Tensor:
    eos, pad = generation_token_ids(tokenizer)
    rows = range(len(data.eval)) if rows is None else rows
    model.eval()
    return generate_answers(model, [prompt_ids(data.eval[i]) for i in rows], max_new_tokens=MAX_NEW,
                            eos_id=eos, pad_id=pad)


def score(model, data, tokenizer) -> tuple[float, list[str]]:
    eos, _ = generation_token_ids(tokenizer)
    predictions = [decode_answer(tokenizer, a, eos) for a in answers(model, data, tokenizer)]
    return exact_match(predictions, data.eval_answers), predictions


@pytest.fixture(scope="module")
def memorized(tmp_path_factory, data, tokenizer):
    """The tiny Llama before and after 60 full-batch AdamW steps on the 7 pairs (adapters only train)."""
    model = tiny_llama(str(tmp_path_factory.mktemp("models")))
    before = score(model, data, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    batch = data.collate(data.train)
    model.train()
    for _ in range(60):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, before


def test_prompt_ids_are_the_tokenized_prompt(data, tokenizer):
    for (prompt, _), row in zip(PAIRS, data.eval, strict=True):
        assert prompt_ids(row) == tokenizer(prompt)["input_ids"]  # [CLS] prompt [SEP], as trained


def test_memorized_answers_are_generated_exactly(memorized, data, tokenizer):
    model, (exact_before, predictions_before) = memorized
    assert exact_before == 0.0 and all(p.strip() for p in predictions_before)  # random words, none right
    exact_after, predictions_after = score(model, data, tokenizer)
    assert exact_after == 1.0, predictions_after
    assert predictions_after == [answer for _, answer in PAIRS]


def test_left_padded_batch_gives_each_prompt_its_own_answer(memorized, data, tokenizer):
    model, _ = memorized
    lengths = {len(prompt_ids(row)) for row in data.eval}
    assert len(lengths) > 1  # the batch really is padded
    batched = answers(model, data, tokenizer)
    one_by_one = torch.cat([answers(model, data, tokenizer, [i]) for i in range(len(data.eval))])
    assert torch.equal(batched, one_by_one)


def test_answers_end_at_the_end_token(memorized, data, tokenizer):
    model, _ = memorized
    eos, _ = generation_token_ids(tokenizer)
    for row in answers(model, data, tokenizer):
        ends = (row == eos).nonzero().flatten()
        assert len(ends) == 1 and (row[ends[0] + 1:] == -1).all()  # nothing but the marker after the end
    assert decode_answer(tokenizer, torch.tensor([3000, eos, 3001, -1]), eos) == tokenizer.decode([3000])


def test_held_weights_change_no_answer_and_are_released(memorized, data, tokenizer):
    """Generation holds each layer's dequantized weight for the call (not one dequantization per token): the
    tokens are those of the per-forward path, a budget too small to hold any layer changes nothing either, and
    nothing stays held after the call."""
    from workers.qlayers import QuantLoraLinear, weights_held

    model, _ = memorized
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    eos, pad = generation_token_ids(tokenizer)
    prompts = [prompt_ids(data.eval[i]) for i in range(len(data.eval))]
    with torch.no_grad():
        per_forward = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=MAX_NEW, do_sample=False,
                                     eos_token_id=eos, pad_token_id=pad)
    with weights_held(model, torch.float32) as held:
        assert held == len(layers) and all(m._held is not None for m in layers)
        with torch.no_grad():
            cached = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=MAX_NEW, do_sample=False,
                                    eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(cached, per_forward) and all(m._held is None for m in layers)
    with weights_held(model, torch.float32, budget_bytes=1) as held, torch.no_grad():
        assert held == 0
        none_held = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=MAX_NEW, do_sample=False,
                                   eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(none_held, per_forward)
