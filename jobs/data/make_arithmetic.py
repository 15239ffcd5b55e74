"""Writes arithmetic.jsonl: 600 GSM8K-style prompt/answer pairs ('... = 30 #### 30') for the causal-LM example.

    python jobs/data/make_arithmetic.py
"""

import json
import os
import random

rng = random.Random(0)
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arithmetic.jsonl")
with open(path, "w") as f:
    for _ in range(600):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        words = {"+": "plus", "-": "minus", "*": "times"}[op]
        question = f"Question: what is {a} {words} {b}?"
        answer = f"{a} {op} {b} = {value} #### {value}"
        f.write(json.dumps({"question": question, "answer": answer, "text": f"{question} Answer: {answer}"}) + "\n")
