"""Writes the arithmetic prompt -> answer data sets (GSM8K-style answers: '... = 30 #### 30').

    python jobs/data/make_arithmetic.py

- arithmetic.jsonl: 600 one-step problems ('what is 12 plus 7?'), the README demo's data (unchanged since it
  was first written: the demo's measured figures refer to it).
- arithmetic-train.jsonl (4,000) and arithmetic-test.jsonl (500, fixed): the fidelity benchmark's harder set
  (bench/bench_fidelity_llm.py). A mix of one-step problems, word problems and two-step problems whose answer
  shows the intermediate result ('7 * 3 = 21, 21 + 5 = 26 #### 26'); no test question occurs in the training set.
Every file is a pure function of its seed, so rerunning this script rewrites the same bytes.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = {"+": "plus", "-": "minus", "*": "times"}
ITEMS = ("apples", "books", "coins", "marbles", "stamps", "pencils", "cards", "shells")
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _record(question: str, answer: str) -> dict:
    return {"question": question, "answer": answer, "text": f"{question} Answer: {answer}"}


def one_step(rng: random.Random) -> dict:
    """'what is a <op> b?' over small numbers (the demo's problem)."""
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice(["+", "-", "*"])
    value = _apply(a, op, b)
    return _record(f"Question: what is {a} {WORDS[op]} {b}?", f"{a} {op} {b} = {value} #### {value}")


def word_problem(rng: random.Random) -> dict:
    """A one-step story: someone has some items and gains, loses, or gets boxes of them."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 90), rng.randint(2, 30)
    kind = rng.choice(["gain", "lose", "boxes"])
    if kind == "gain":
        question, op = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", "+"
    elif kind == "lose":
        a = max(a, b + 1)
        question, op = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", "-"
    else:
        a = rng.randint(2, 12)
        question, op = f"{name} buys {a} boxes with {b} {item} in each. How many {item} is that?", "*"
    value = _apply(a, op, b)
    return _record(f"Question: {question}", f"{a} {op} {b} = {value} #### {value}")


def two_step(rng: random.Random) -> dict:
    """'what is a <op1> b <op2> c?' with '*' first where it appears (the usual precedence), showing both steps."""
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(2, 30)
    op1, op2 = rng.choice(["+", "-", "*"]), rng.choice(["+", "-"])
    if op1 == "*":
        first = a * b
        answer = f"{a} * {b} = {first}, {first} {op2} {c} = {_apply(first, op2, c)}"
        value = _apply(first, op2, c)
    else:  # left to right: (a op1 b) op2 c
        first = _apply(a, op1, b)
        value = _apply(first, op2, c)
        answer = f"{a} {op1} {b} = {first}, {first} {op2} {c} = {value}"
    return _record(f"Question: what is {a} {WORDS[op1]} {b} {WORDS[op2]} {c}?", f"{answer} #### {value}")


def mixed(rng: random.Random) -> dict:
    """One problem of the harder set: 40% one-step, 30% word problems, 30% two-step."""
    draw = rng.random()
    return one_step(rng) if draw < 0.4 else word_problem(rng) if draw < 0.7 else two_step(rng)


def unique(rng: random.Random, n: int, make, exclude: set[str]) -> list[dict]:
    """`n` problems with distinct questions, none of them in `exclude`."""
    out, seen = [], set(exclude)
    while len(out) < n:
        record = make(rng)
        if record["question"] not in seen:
            seen.add(record["question"])
            out.append(record)
    return out


def write_jsonl(name: str, records: list[dict]) -> None:
    with open(os.path.join(HERE, name), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def main() -> None:
    demo_rng = random.Random(0)
    write_jsonl("arithmetic.jsonl", [one_step(demo_rng) for _ in range(600)])
    test = unique(random.Random(1), 500, mixed, set())
    train = unique(random.Random(2), 4000, mixed, {record["question"] for record in test})
    write_jsonl("arithmetic-test.jsonl", test)
    write_jsonl("arithmetic-train.jsonl", train)


if __name__ == "__main__":
    main()
