"""Per-round evaluation: the task metric and calibration (ECE) from scorer outputs and gold labels.

Scorers produce `prediction` and `confidence` label-free; only here, in the driver, are they compared
with the gold labels of the test split.
  verbalizer  confidence = the top verbalizer probability; correct = prediction == label
  generation  confidence = exp(-mean token NLL) of the greedy answer; correct = extracted number == label
On a verbalizer task the result also counts the answers given: an adapter that answers one class for
every row scores the class prior, which an accuracy alone does not tell apart from learning.
"""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import torch


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width bins: sum_b |B|/n * |acc(B) - conf(B)|."""
    from torchmetrics.functional.classification import binary_calibration_error

    conf = torch.as_tensor(confidence, dtype=torch.float64)
    hits = torch.as_tensor(correct, dtype=torch.long)
    if conf.numel() == 0:
        raise ValueError("ECE of an empty set")
    return float(binary_calibration_error(conf.clamp(0.0, 1.0), hits, n_bins=n_bins, norm="l1"))


def evaluate(scored: pa.Table, labels: dict[str, str], task, n_bins: int = 15) -> dict:
    """accuracy and ECE of `scored` (example_id, prediction, confidence) against `labels`."""
    ids = scored.column("example_id").to_pylist()
    missing = [e for e in ids if e not in labels]
    if missing:
        raise ValueError(f"{len(missing)} scored examples have no gold label (e.g. {missing[:3]})")
    preds = scored.column("prediction").to_pylist()
    correct = [task.is_correct(p, labels[e]) for e, p in zip(ids, preds)]
    conf = scored.column("confidence").to_pylist()
    result = {
        "accuracy": sum(correct) / len(correct),
        "ece": expected_calibration_error(conf, correct, n_bins),
        "n": len(correct),
    }
    if task.kind == "verbalizer":  # a generation task's answers are free text: counting them says little
        result["answers"] = dict(Counter(preds))
    return result
