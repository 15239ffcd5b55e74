"""Tokenizing a task's rows, by task type, and the collate that pads a batch of them.

Every row is a dict of token-id lists (plus, for classification and regression, its label); `IGNORE_INDEX` marks
the label positions without loss (a prompt_answer prompt, padding), which the loss and the metrics skip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from workers.task_spec import TaskSpec

if TYPE_CHECKING:  # transformers is heavy; only the type checker needs it here
    from transformers import PreTrainedTokenizerBase

    from workers.tasks import Table

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips: padding, and prompts in prompt_answer


def _texts(table: Table, column: str | None) -> list[str] | None:
    return None if column is None else [str(v) for v in table.columns[column]]


def encode_sequences(table: Table, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """classification / regression: one text or a pair per row (pairs get token_type_ids 0 and 1), plus the label."""
    enc = tokenizer(_texts(table, spec.text_column), _texts(table, spec.text_pair_column), truncation=True,
                    max_length=spec.max_length)
    return [{**_row(enc, i), "labels": label} for i, label in enumerate(table.labels)]


def encode_causal_lm(table: Table, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """causal_lm: the labels are the input ids (the model shifts them); collate pads labels with -100."""
    enc = tokenizer(_texts(table, spec.text_column), truncation=True, max_length=spec.max_length)
    rows = [_row(enc, i) for i in range(len(table))]
    return [{**row, "labels": list(row["input_ids"])} for row in rows]


def encode_prompt_answer(table: Table, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """prompt_answer: prompt + answer + eos, with labels -100 on the prompt so the loss is on the answer only.

    Prompt and answer are tokenized separately (the prompt with the tokenizer's special tokens, the answer
    without), so the boundary between them is exact.
    """
    prompts = tokenizer(_texts(table, spec.prompt_column))["input_ids"]
    answers = tokenizer(_texts(table, spec.answer_column), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt, answer = fit_prompt_answer(prompt, answer + ([eos] if eos is not None else []), spec.max_length)
        ids = prompt + answer
        row = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + answer}
        if with_types:
            row["token_type_ids"] = [0] * len(ids)
        rows.append(row)
    return rows


def fit_prompt_answer(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut prompt + answer to `max_length` tokens without losing the answer.

    Cutting the end of the concatenation (the usual truncation) would drop the answer of a long prompt, leaving
    a row with no loss at all. Instead the prompt loses its first tokens (keeping the end, next to the answer),
    but keeps at least half the budget; only an answer longer than the rest is cut at its end.
    """
    if len(prompt) + len(answer) <= max_length:
        return prompt, answer
    keep = max(max_length - len(answer), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep:]
    return prompt, answer[: max_length - len(prompt)]


def _row(enc: dict[str, list], i: int) -> dict:
    return {key: values[i] for key, values in enc.items()}


ENCODERS: dict[str, Callable[[Table, TaskSpec, PreTrainedTokenizerBase], list[dict]]] = {
    "classification": encode_sequences,
    "regression": encode_sequences,
    "causal_lm": encode_causal_lm,
    "prompt_answer": encode_prompt_answer,
}

PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}  # input_ids: the tokenizer's pad id


def make_collate(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collate that right-pads every token list to the longest row of the batch.

    input_ids get the pad id (or eos, or 0, for tokenizers without one: the attention mask hides it anyway),
    attention_mask and token_type_ids 0, token labels -100; per-row labels (class id or float) are stacked.
    """
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        out = {}
        for key, first in batch[0].items():
            if not isinstance(first, list):
                out[key] = torch.tensor([row[key] for row in batch])  # int -> int64, float -> float32
                continue
            fill = PAD_VALUES.get(key, pad_id)
            out[key] = torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in batch], dtype=torch.long)
        return out

    return collate


