"""Selection strategies: each maps per-example scorer outputs to one acquisition score (higher = pick first).

Like baal's heuristics, a strategy is tiny and sees numbers only: `acquisition(u_base, u_lora, round)`,
where u_base / u_lora are the chosen uncertainty measure of the frozen base model and of the current
adapter (MC-averaged), aligned with the pool's example_ids. `select` takes the top b, breaking ties by a
seeded random key, so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np
import torch

from pipeline.uncertainty import LambdaSchedule, dynamic_score, minmax_normalize


@dataclass
class Strategy:
    name: ClassVar[str] = ""
    uses_base: ClassVar[bool] = False
    uses_lora: ClassVar[bool] = True

    def acquisition(self, u_base: Optional[np.ndarray], u_lora: Optional[np.ndarray], round: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


@dataclass
class Random(Strategy):
    name: ClassVar[str] = "random"
    uses_lora: ClassVar[bool] = False

    def acquisition(self, u_base, u_lora, round, rng):
        n = len(u_base) if u_base is not None else len(u_lora)
        return rng.random(n)


@dataclass
class Uncertainty(Strategy):
    """Rank by the adapter's own uncertainty: entropy (ME), pe, least_confidence, margin or bald."""

    name: ClassVar[str] = "uncertainty"

    def acquisition(self, u_base, u_lora, round, rng):
        return np.asarray(u_lora, dtype=np.float64)


@dataclass
class Star(Strategy):
    """STAR's dynamic mix: λ_k · norm(u_lora) + (1 − λ_k) · norm(u_base)."""

    name: ClassVar[str] = "star"
    uses_base: ClassVar[bool] = True
    schedule: LambdaSchedule = field(default_factory=LambdaSchedule)

    def acquisition(self, u_base, u_lora, round, rng):
        lam = self.schedule(round)
        return dynamic_score(torch.as_tensor(u_lora), torch.as_tensor(u_base), lam).numpy()


@dataclass
class Subtract(Strategy):
    """The paper's ablation: norm(u_lora) − norm(u_base), favouring what the adapter made less sure."""

    name: ClassVar[str] = "subtract"
    uses_base: ClassVar[bool] = True

    def acquisition(self, u_base, u_lora, round, rng):
        return (minmax_normalize(torch.as_tensor(u_lora)) - minmax_normalize(torch.as_tensor(u_base))).numpy()


MEASURE_STRATEGIES = ("entropy", "pe", "least_confidence", "margin", "bald")
# Which scorer column holds each measure, per task kind. Verbalizer "pe" is the NLL of the model's own
# (argmax) label; margin and BALD need a class distribution, so generation tasks do not have them.
MEASURE_COLUMNS = {
    "verbalizer": {"entropy": "entropy", "me": "entropy", "pe": "pe", "least_confidence": "least_confidence",
                   "margin": "margin", "bald": "bald"},
    "generation": {"entropy": "me", "me": "me", "pe": "pe", "least_confidence": "least_confidence"},
}


def measure_column(task_kind: str, measure: str) -> str:
    """The scorer column for `measure` ("auto": entropy for verbalizer tasks, pe for generation)."""
    if measure == "auto":
        measure = "pe" if task_kind == "generation" else "entropy"
    columns = MEASURE_COLUMNS[task_kind]
    if measure not in columns:
        raise ValueError(f"measure {measure!r} is not available for a {task_kind} task; choose one of {sorted(columns)}")
    return columns[measure]
STRATEGIES = ("random", "star", "subtract") + MEASURE_STRATEGIES


def get_strategy(name: str, schedule: Optional[LambdaSchedule] = None) -> Strategy:
    if name == "random":
        return Random()
    if name == "star":
        return Star(schedule or LambdaSchedule())
    if name == "subtract":
        return Subtract()
    if name in MEASURE_STRATEGIES:
        return Uncertainty()
    raise ValueError(f"strategy should be one of {list(STRATEGIES)}, got {name!r}")


def select(example_ids: list[str], acquisition: np.ndarray, b: int, rng: np.random.Generator) -> list[str]:
    """The b highest-scoring example_ids, best first; equal scores are ordered by a seeded random key."""
    if len(example_ids) != len(acquisition):
        raise ValueError(f"{len(example_ids)} ids but {len(acquisition)} scores")
    acquisition = np.asarray(acquisition, dtype=np.float64)
    if np.isnan(acquisition).any():
        raise ValueError("acquisition scores contain NaN")
    tiebreak = rng.random(len(example_ids))
    order = np.lexsort((tiebreak, -acquisition))  # last key is primary
    return [example_ids[i] for i in order[: min(b, len(example_ids))]]
