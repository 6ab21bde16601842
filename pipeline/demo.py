"""The demo task, generated in code so the quickstart needs no download.

True/false questions comparing two two-digit numbers ("is 57 greater than 23?"), in BoolQ's prompt
format. Seeded and deterministic, every question distinct, the two classes balanced. SmolLM2-135M ranks
these with real but inverted signal (AUC 0.26 of p(true) on 120 questions) and answers "true" to all,
so its base accuracy is 50%.

The pool and the test split never share a question: a pair of numbers {a, b} belongs to the test split
when (a + b) % 5 == 0 and to the pool otherwise, whichever way round it is asked.
"""
from __future__ import annotations

import random

SPLITS = ("pool", "test")
TEST_SEED_OFFSET = 10_000  # the test split also draws under another seed


def _in_split(a: int, b: int, split: str) -> bool:
    return ((a + b) % 5 == 0) == (split == "test")


_DISTINCT = {s: sum(_in_split(a, b, s) for a in range(10, 100) for b in range(10, 100) if a != b) for s in SPLITS}


def demo_rows(n: int, seed: int = 0, split: str = "pool") -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split should be one of {SPLITS}, got {split!r}")
    if n > _DISTINCT[split]:
        raise ValueError(f"the demo {split} split has {_DISTINCT[split]} distinct questions, asked for {n}")
    rng = random.Random(seed + (TEST_SEED_OFFSET if split == "test" else 0))
    rows, seen = [], set()
    for i in range(n):
        while True:
            a, b = rng.sample(range(10, 100), 2)
            if (a > b) != (i % 2 == 0):  # balance the classes by swapping the operands
                a, b = b, a
            if (a, b) not in seen and _in_split(a, b, split):  # every question once, each in one split only
                seen.add((a, b))
                break
        question = (
            "Please answer the following question with true or false, question: "
            f"is {a} greater than {b}?\n\nAnswer format: true/false"
        )
        rows.append({"question": question, "answer": f"the correct answer is {'true' if a > b else 'false'}"})
    rng.shuffle(rows)
    return rows
