"""Calibration data for `method: cloq`: each target layer's input Gram matrix X^T X over N real samples.

The full-precision model runs once over the calibration texts (no gradients); a forward pre-hook on every
target linear layer adds x^T x of its input rows, real tokens only (padding is masked out). Layers that read
the same input tensor (q/k/v after one norm, gate/up: called one after another on the very same tensor object)
share one Gram matrix: it is computed once and the dict maps each of their names to the same tensor. The Gram
matrices are divided by the token count (cloq is invariant to their scale; the mean keeps float32 well inside
its range). `workers.calibration_layerwise` gathers the same Grams with one decoder layer in memory at a time,
through the same hooks (`GramHooks`) and batches (`tokenized_batches`).

`CalibrationSource` names the data (a local file, its text columns, the first `samples` rows);
`read_calibration` turns it into `CalibrationData` (the texts and the token budget), whose `fingerprint` (of
the texts, their count and the budget) goes into the cache key of a calibrated base: other calibration data
builds another base.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.cloq import DAMPING
from workers.messages import brief, clip
from workers.task_spec import FORMATS  # the files a task reads: the same ones

DEFAULT_SAMPLES = 128
DEFAULT_MAX_LENGTH = 512


class CalibrationError(ValueError):
    """Calibration data that cannot be used: `field` is the calibration field at fault ('calibration.file',
    'calibration.column', ...), `message` names the file or column; str() is 'field: message'."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration texts come from: the first `samples` non-empty rows of `file`, each row's `columns`
    joined by a space (a prompt -> answer task: prompt and answer, as training sees them)."""

    file: str
    columns: tuple[str, ...] = ("text",)
    samples: int = DEFAULT_SAMPLES
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per sample; longer texts are truncated
    csv_encoding: str = "utf-8"
    holdout: tuple[float, int] | None = None  # (eval_fraction, seed): skip the rows a task's split holds out
    damping: float = DAMPING  # goes with the data into CalibrationData (and so into the cache key)


@dataclass(frozen=True)
class CalibrationData:
    """The texts a calibrated base is built from, the token budget per text, and where they came from."""

    texts: tuple[str, ...]
    max_length: int = DEFAULT_MAX_LENGTH
    origin: str = ""  # for the manifest: the file and columns
    damping: float = DAMPING  # the weighted step's lambda, x mean(diag(X^T X)) (workers/cloq.py)

    @property
    def fingerprint(self) -> str:
        return calibration_fingerprint(self.texts, self.max_length)

    def key_fields(self) -> dict:
        """What of it a cache key records: the fingerprint, the sample count, the token budget and the damping."""
        return {"fingerprint": self.fingerprint, "samples": len(self.texts), "max_length": self.max_length,
                "damping": self.damping}


@dataclass(frozen=True)
class CalibrationGrams:
    """Per-module mean input Gram matrices [in, in] (float32), the tokens they average and the data's fingerprint."""

    grams: dict[str, torch.Tensor]
    tokens: int
    samples: int
    fingerprint: str


def read_calibration(source: CalibrationSource) -> CalibrationData:
    """The first `source.samples` non-empty texts of `source.file` (fewer if the file is shorter).

    CalibrationError (naming the file, and the column where it is the problem) for a missing or unreadable file,
    a missing column, non-text values, or no usable row."""
    file = source.file
    if not isinstance(source.samples, int) or source.samples < 1:
        raise CalibrationError("calibration.samples", f"expected an integer >= 1, got {brief(source.samples)}")
    if not isinstance(source.max_length, int) or source.max_length < 1:
        raise CalibrationError("calibration.max_length", f"expected an integer >= 1, got {brief(source.max_length)}")
    if (problem := damping_problem(source.damping)) is not None:
        raise CalibrationError("calibration.damping", problem)
    data = _read_rows(source)
    rows = range(data.num_rows)
    if source.holdout is not None:  # a task's training rows only (workers.tasks.split_indices), in file order
        from workers.tasks import split_indices

        rows = sorted(split_indices(data.num_rows, *source.holdout)[0])
    texts = []
    columns = {column: data[column] for column in source.columns}  # each column read once, as a list
    for row in rows:
        parts = [_text_at(columns[column], column, row, file) for column in source.columns]
        text = " ".join(part for part in parts if part and part.strip())
        if text.strip():
            texts.append(text)
            if len(texts) == source.samples:
                break
    if not texts:
        raise CalibrationError("calibration.file", f"{clip(file, 300)} has no non-empty text in column(s) "
                               f"{brief(list(source.columns))}")
    return CalibrationData(tuple(texts), source.max_length, f"{file} [{', '.join(source.columns)}]", source.damping)


def damping_problem(damping) -> str | None:
    """What is wrong with a damping value (the spec and `read_calibration` both ask), or None."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < float("inf"):
        return f"expected a number > 0 (default {DAMPING:g}), got {brief(damping)}"
    return None


def _read_rows(source: CalibrationSource):
    """The file as a datasets.Dataset, its columns checked."""
    import datasets

    file = source.file
    builder = FORMATS.get(os.path.splitext(file)[1].lower())
    if builder is None:
        raise CalibrationError("calibration.file", f"{clip(file, 300)}: expected a {'/'.join(FORMATS)} file")
    if not os.path.isfile(file):
        raise CalibrationError("calibration.file", f"no such file {clip(file, 300)}")
    options = {"encoding": source.csv_encoding} if builder == "csv" else {}
    try:
        data = datasets.load_dataset(builder, data_files=os.path.abspath(file), split="train", **options)
    except Exception as exc:  # a parse error deep inside datasets: say which file
        raise CalibrationError("calibration.file", f"cannot read {clip(file, 300)} as {builder}: "
                               f"{type(exc).__name__}: {clip(str(exc), 300)}") from exc
    for column in source.columns:
        if column not in data.column_names:
            raise CalibrationError("calibration.column", f"no column {brief(column)} in {clip(file, 300)}; "
                                   f"its columns are {brief(data.column_names, 300)}")
    return data


def _text_at(values: list, column: str, row: int, file: str) -> str | None:
    value = values[row]
    if value is not None and not isinstance(value, str):
        raise CalibrationError("calibration.column", f"{clip(file, 300)} row {row}: expected text in column "
                               f"{brief(column)}, got {type(value).__name__}")
    return value


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
    hooks = GramHooks()
    handles = hooks.attach({name: found[name] for name in modules})
    tokens = 0
    try:
        tokens = _run_batches(model, tokenizer, texts, max_length, batch_size, hooks, on_batch)
    finally:
        for handle in handles:
            handle.remove()
    return CalibrationGrams(hooks.grams(tokens), tokens, len(texts), calibration_fingerprint(texts, max_length))


class GramHooks:
    """Forward pre-hooks that sum x^T x of each target's input rows (real tokens only), and the Gram sharing.

    A target that reads the very tensor object the previous target of the same batch read (q/k/v after one norm,
    gate/up) shares that target's Gram: it is summed once. Call `start_batch` with the batch's attention mask
    before each forward pass (gather_grams: the whole model; workers.calibration_layerwise: one layer)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self.mask: torch.Tensor | None = None
        self._last: tuple[torch.Tensor | None, str] = (None, "")

    def start_batch(self, mask: torch.Tensor | None) -> None:
        self.mask, self._last = mask, (None, "")

    def attach(self, modules: dict[str, nn.Module]) -> list:
        """A pre-hook on each named module; the handles (remove them when done)."""
        return [module.register_forward_pre_hook(self._hook_for(name)) for name, module in modules.items()]

    def _hook_for(self, name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            last, last_name = self._last
            if x is last:  # the previous target read this very tensor (q/k/v, gate/up): same Gram
                self.alias[name] = last_name
                return
            self._last = (x, name)  # held, so its identity cannot be reused by another tensor
            rows = _real_rows(x, self.mask).float()
            product = rows.T @ rows
            self.sums[name] = product if name not in self.sums else self.sums[name] + product
        return hook

    def pop(self, names: Sequence[str], tokens: int) -> dict[str, torch.Tensor]:
        """The mean Grams of `names` (finished: nothing more will run through them), taken out of the sums so that
        they can leave this process; names that share a Gram share the tensor. Names that never ran are left out."""
        means: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name in names:
            target = self.alias.pop(name, name)
            if target not in means:
                total = self.sums.pop(target, None)
                if total is None:
                    continue
                means[target] = (total / max(tokens, 1)).cpu()
            out[name] = means[target]
        return out

    def grams(self, tokens: int) -> dict[str, torch.Tensor]:
        """The mean Gram of every hooked module that ran (on the CPU); modules that share one map to one tensor."""
        grams = {name: (total / max(tokens, 1)).cpu() for name, total in self.sums.items()}
        for name, target in self.alias.items():
            grams[name] = grams[target]
        return grams


def _real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of x [..., in] at real (unpadded) token positions, as [n, in]."""
    flat = x.reshape(-1, x.shape[-1])
    if mask is None or mask.numel() != flat.shape[0]:
        return flat
    return flat[mask.reshape(-1).to(torch.bool)]


@torch.no_grad()
def _run_batches(model, tokenizer, texts, max_length, batch_size, hooks: GramHooks, on_batch) -> int:
    """Forward every batch of texts through the model; the number of real tokens seen."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for end, batch in tokenized_batches(tokenizer, texts, max_length, batch_size):
            mask = batch["attention_mask"].to(device)
            hooks.start_batch(mask)
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
            tokens += int(mask.sum())
            if on_batch is not None:
                on_batch(end, len(texts))
    finally:
        model.train(was_training)
    return tokens


def tokenized_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
    """(texts done, batch) for each run of `batch_size` texts: padded to the batch's longest, truncated to
    `max_length`; a tokenizer without a pad token pads with its end-of-sequence token (padding is masked anyway)."""
    if tokenizer.pad_token_id is None:  # decoder-only tokenizers often have none
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length)
        yield min(start + batch_size, len(texts)), batch
