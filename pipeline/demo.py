"""The demo task, generated in code so the quickstart needs no download.

True/false questions on arithmetic comparisons, in BoolQ's prompt format. Seeded and deterministic; the two
classes are balanced and the distance |a op b - c| ranges from 1 (hard) to 30 (easy).
"""
from __future__ import annotations

import random

TEST_SEED_OFFSET = 10_000  # the test split is the same generator under another seed


def demo_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        truth = i % 2 == 0
        gap = rng.randint(1, 30)
        c = value - gap if truth else value + rng.randint(0, 30)
        relation = "greater than"
        question = (
            "Please answer the following question with true or false, question: "
            f"is {a} {op} {b} {relation} {c}?\n\nAnswer format: true/false"
        )
        rows.append({"question": question, "answer": f"the correct answer is {'true' if truth else 'false'}"})
    rng.shuffle(rows)
    return rows
