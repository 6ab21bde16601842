"""Selection strategies: each maps per-example scorer outputs to one acquisition score (higher = pick first).

Like baal's heuristics, a strategy is tiny and sees numbers only: `acquisition(scores, rng)`, where
`scores.u_base` / `scores.u_lora` hold the strategy's own measure for the frozen base model and for the
current adapter (MC-averaged), aligned with the unlabelled pool's example_ids. `select` takes the top b,
breaking ties by a seeded random key, so a run is reproducible.

Which measure a strategy ranks by:
  entropy, pe, least_confidence, margin, bald   that measure of the adapter, each from its own column
  star, subtract                                al.measure (auto: entropy, or pe for generation tasks),
                                                of both the base model and the adapter
  random                                        none: nothing is scored
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import MEASURE_STRATEGIES, STRATEGY_NAMES
from pipeline.uncertainty import LambdaSchedule, dynamic_score, minmax_normalize


@dataclass(frozen=True)
class RoundScores:
    """What a strategy may look at in one round: n unlabelled rows, their u_base / u_lora (None when the
    strategy does not use them) and the index of the adapter that produced u_lora (round k uses k - 1)."""

    n: int
    u_base: Optional[np.ndarray] = None
    u_lora: Optional[np.ndarray] = None
    adapter: int = 0


@dataclass
class Strategy:
    name: ClassVar[str] = ""
    uses_base: ClassVar[bool] = False
    uses_lora: ClassVar[bool] = True
    measure: Optional[str] = None  # the scorer column ranked by (None: random)

    def acquisition(self, scores: RoundScores, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def weight(self, adapter: int) -> Optional[float]:
        """λ, the weight of u_lora, when the strategy mixes; None otherwise."""
        return None


@dataclass
class Random(Strategy):
    name: ClassVar[str] = "random"
    uses_lora: ClassVar[bool] = False

    def acquisition(self, scores, rng):
        return rng.random(scores.n)


@dataclass
class Uncertainty(Strategy):
    """Rank by the adapter's own uncertainty in one measure column (entropy, pe, least_confidence, ...)."""

    name: ClassVar[str] = "uncertainty"

    def acquisition(self, scores, rng):
        return np.asarray(scores.u_lora, dtype=np.float64)


@dataclass
class Star(Strategy):
    """STAR's dynamic mix: λ · norm(u_lora) + (1 − λ) · norm(u_base), λ indexed by the adapter that scored
    (adapter i gives λ = min(1, 0.1·(i + 1)), as in the reference code: round 1 selects with λ = 0.1)."""

    name: ClassVar[str] = "star"
    uses_base: ClassVar[bool] = True
    schedule: LambdaSchedule = field(default_factory=LambdaSchedule)

    def weight(self, adapter):
        return self.schedule(adapter)

    def acquisition(self, scores, rng):
        lam = self.weight(scores.adapter)
        return dynamic_score(torch.as_tensor(scores.u_lora), torch.as_tensor(scores.u_base), lam).numpy()


@dataclass
class Subtract(Strategy):
    """The paper's ablation: norm(u_lora) − norm(u_base), favouring what the adapter made less sure."""

    name: ClassVar[str] = "subtract"
    uses_base: ClassVar[bool] = True

    def acquisition(self, scores, rng):
        return (minmax_normalize(torch.as_tensor(scores.u_lora)) - minmax_normalize(torch.as_tensor(scores.u_base))).numpy()


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


def strategy_measure(strategy: str, measure: str) -> str:
    """The measure a strategy ranks by: its own name for a measure strategy, else al.measure."""
    return strategy if strategy in MEASURE_STRATEGIES else measure


def get_strategy(name: str, task_kind: str = "verbalizer", measure: str = "auto",
                 schedule: Optional[LambdaSchedule] = None) -> Strategy:
    """The strategy `name`, ranking by the column its measure has for `task_kind`."""
    if name not in STRATEGY_NAMES:
        raise ValueError(f"strategy should be one of {list(STRATEGY_NAMES)}, got {name!r}")
    if name == "random":
        return Random()
    column = measure_column(task_kind, strategy_measure(name, measure))
    if name == "star":
        return Star(column, schedule or LambdaSchedule())
    if name == "subtract":
        return Subtract(column)
    return Uncertainty(column)


def select(example_ids, acquisition: np.ndarray, b: int, rng: np.random.Generator) -> list[str]:
    """The b highest-scoring example_ids (a list or an Arrow array), best first; equal scores are ordered
    by a seeded random key."""
    if len(example_ids) != len(acquisition):
        raise ValueError(f"{len(example_ids)} ids but {len(acquisition)} scores")
    top = top_positions(acquisition, b, rng)
    if isinstance(example_ids, (pa.Array, pa.ChunkedArray)):
        return example_ids.take(pa.array(top, pa.int64())).to_pylist()
    return [example_ids[i] for i in top]


def top_positions(acquisition: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the b highest scores, best first; equal scores are ordered by a seeded random key.

    Only the rows at or above the b-th highest score are sorted (a partition finds it): on a large pool the
    driver holds the scores and one copy of them, not a sort of every row with its random key."""
    acquisition = np.asarray(acquisition, dtype=np.float64)
    if np.isnan(acquisition).any():
        raise ValueError("acquisition scores contain NaN")
    n, b = len(acquisition), min(b, len(acquisition))
    if b <= 0:
        return np.empty(0, np.int64)
    kth = np.partition(acquisition, n - b)[n - b]
    contenders = np.flatnonzero(acquisition >= kth)  # the top b and every row tied with the b-th
    tiebreak = rng.random(len(contenders))
    return contenders[np.lexsort((tiebreak, -acquisition[contenders]))[:b]]  # last key is primary
