"""Calibration data for `method: cloq`: each target layer's input Gram matrix X^T X over N real samples.

The full-precision model runs once over the calibration texts (no gradients); a forward pre-hook on every
target linear layer adds x^T x of its input rows, real tokens only (padding is masked out). Layers that read
the same input tensor (q/k/v after one norm, gate/up: called one after another on the very same tensor object)
share one Gram matrix: it is computed once and the dict maps each of their names to the same tensor. The Gram
matrices are divided by the token count (cloq is invariant to their scale; the mean keeps float32 well inside
its range).

`CalibrationSource` names the data (a local file and a text column, the first `samples` rows); its
`fingerprint` (of the texts read, their count and the token budget) goes into the cache key of a calibrated
base, so another calibration set builds another base.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.messages import brief, clip
from workers.task_spec import FORMATS  # the files a task reads: the same ones

DEFAULT_SAMPLES = 128
DEFAULT_MAX_LENGTH = 512


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message names the file, the column or the field."""


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration texts come from: `file`'s column `column`, its first `samples` non-empty rows."""

    file: str
    column: str = "text"
    samples: int = DEFAULT_SAMPLES
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per sample; longer texts are truncated


@dataclass(frozen=True)
class CalibrationGrams:
    """Per-module mean input Gram matrices [in, in] (float32), the tokens they average and the data's fingerprint."""

    grams: dict[str, torch.Tensor]
    tokens: int
    samples: int
    fingerprint: str


def read_calibration_texts(source: CalibrationSource) -> list[str]:
    """The first `source.samples` non-empty texts of `source.column` in `source.file` (fewer if the file is shorter).

    CalibrationError (naming the file, and the column where it is the problem) for a missing or unreadable file,
    a missing column, non-text values, or no usable row."""
    import datasets

    file = source.file
    builder = FORMATS.get(os.path.splitext(file)[1].lower())
    if builder is None:
        raise CalibrationError(f"calibration.file: {clip(file, 300)}: expected a {'/'.join(FORMATS)} file")
    if not os.path.isfile(file):
        raise CalibrationError(f"calibration.file: no such file {clip(file, 300)}")
    if not isinstance(source.samples, int) or source.samples < 1:
        raise CalibrationError(f"calibration.samples: expected an integer >= 1, got {brief(source.samples)}")
    try:
        data = datasets.load_dataset(builder, data_files=os.path.abspath(file), split="train")
    except Exception as exc:  # a parse error deep inside datasets: say which file
        raise CalibrationError(f"calibration.file: cannot read {clip(file, 300)} as {builder}: "
                               f"{type(exc).__name__}: {clip(str(exc), 300)}") from exc
    if source.column not in data.column_names:
        raise CalibrationError(f"calibration.column: no column {brief(source.column)} in {clip(file, 300)}; "
                               f"its columns are {brief(data.column_names, 300)}")
    texts = []
    for row, value in enumerate(data[source.column]):
        if value is not None and not isinstance(value, str):
            raise CalibrationError(f"calibration.column: {clip(file, 300)} row {row}: expected text in column "
                                   f"{brief(source.column)}, got {type(value).__name__}")
        if value and value.strip():
            texts.append(value)
            if len(texts) == source.samples:
                break
    if not texts:
        raise CalibrationError(f"calibration.file: {clip(file, 300)} has no non-empty text in column "
                               f"{brief(source.column)}")
    return texts


def calibration_fingerprint(texts: Sequence[str], max_length: int) -> str:
    """A sha256 of the texts (length-prefixed, in order), their count and the token budget."""
    digest = hashlib.sha256(f"calibration-v1 n={len(texts)} max_length={max_length}\n".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def gather_grams(model: nn.Module, tokenizer, texts: Sequence[str], modules: Sequence[str], *,
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
                 on_batch: Callable[[int, int], None] | None = None) -> CalibrationGrams:
    """Run `model` over `texts` and return the mean input Gram matrix of each named linear module.

    `modules` are names from `model.named_modules()` (nn.Linear); a missing name is a KeyError naming it.
    `on_batch(done, total)` is called after each batch (progress)."""
    found = dict(model.named_modules())
    missing = [name for name in modules if name not in found]
    if missing:
        raise KeyError(f"calibration: the model has no module {missing[0]!r}")
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    batch_state: dict = {"mask": None, "last": (None, "")}

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            last, last_name = batch_state["last"]
            if x is last:  # the previous target read this very tensor (q/k/v, gate/up): same Gram
                alias[name] = last_name
                return
            batch_state["last"] = (x, name)  # held, so its identity cannot be reused by another tensor
            rows = _real_rows(x, batch_state["mask"]).float()
            product = rows.T @ rows
            sums[name] = product if name not in sums else sums[name] + product
        return hook

    handles = [found[name].register_forward_pre_hook(hook_for(name)) for name in modules]
    tokens = 0
    try:
        tokens = _run_batches(model, tokenizer, texts, max_length, batch_size, batch_state, on_batch)
    finally:
        for handle in handles:
            handle.remove()
    grams = {name: (total / max(tokens, 1)).cpu() for name, total in sums.items()}
    for name, target in alias.items():
        grams[name] = grams[target]
    return CalibrationGrams(grams, tokens, len(texts), calibration_fingerprint(texts, max_length))


def _real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of x [..., in] at real (unpadded) token positions, as [n, in]."""
    flat = x.reshape(-1, x.shape[-1])
    if mask is None or mask.numel() != flat.shape[0]:
        return flat
    return flat[mask.reshape(-1).to(torch.bool)]


@torch.no_grad()
def _run_batches(model, tokenizer, texts, max_length, batch_size, batch_state, on_batch) -> int:
    """Forward every batch of texts through the model; the number of real tokens seen."""
    if tokenizer.pad_token_id is None:  # decoder-only tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length)
            mask = batch["attention_mask"].to(device)
            batch_state["mask"], batch_state["last"] = mask, (None, "")
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
            tokens += int(mask.sum())
            if on_batch is not None:
                on_batch(min(start + batch_size, len(texts)), len(texts))
    finally:
        model.train(was_training)
    return tokens
