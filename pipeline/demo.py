"""The demo task, generated in code so the quickstart needs no download.

True/false questions comparing two two-digit numbers ("is 57 greater than 23?"), in BoolQ's prompt
format. Seeded and deterministic, every question distinct, the two classes balanced. SmolLM2-135M ranks
these with real but inverted signal (AUC 0.26 of p(true) on 120 questions) and answers "true" to all,
so its base accuracy is 50%.
"""
from __future__ import annotations

import random

TEST_SEED_OFFSET = 10_000  # the test split is the same generator under another seed
_DISTINCT = 90 * 89  # ordered pairs of distinct two-digit numbers


def demo_rows(n: int, seed: int = 0) -> list[dict]:
    if n > _DISTINCT:
        raise ValueError(f"the demo task has {_DISTINCT} distinct questions, asked for {n}")
    rng = random.Random(seed)
    rows, seen = [], set()
    for i in range(n):
        while True:
            a, b = rng.sample(range(10, 100), 2)
            if (a > b) != (i % 2 == 0):  # balance the classes by swapping the operands
                a, b = b, a
            if (a, b) not in seen:  # every question once: a pool has no duplicate rows
                seen.add((a, b))
                break
        question = (
            "Please answer the following question with true or false, question: "
            f"is {a} greater than {b}?\n\nAnswer format: true/false"
        )
        rows.append({"question": question, "answer": f"the correct answer is {'true' if a > b else 'false'}"})
    rng.shuffle(rows)
    return rows
