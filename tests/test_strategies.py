"""Selection strategies on hand-made inputs whose rankings differ by measure, with exact expected ids.

The MC probabilities below are built so that entropy, least confidence, margin and BALD each put a
different example first: a strategy that secretly ranks by another measure fails here.
"""
import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.strategies import RoundScores, Star, get_strategy, measure_column, select
from pipeline.uncertainty import LambdaSchedule, verbalizer_uncertainty

IDS = ["a", "b", "c", "d", "e"]
U_BASE = np.array([0.9, 0.1, 0.5, 0.3, 0.7])  # normalised: 1, 0, .5, .25, .75
U_LORA = np.array([0.0, 0.8, 0.4, 1.0, 0.2])  # normalised: 0, .8, .4, 1, .2

# (N=5, T=2, C=3) MC passes over three label words.
PROBS = {
    "w": [[.39, .37, .24]] * 2,                 # lowest top probability: least confidence
    "x": [[.40, .30, .30]] * 2,                 # flattest: entropy
    "y": [[.45, .45, .10]] * 2,                 # top two tie: margin
    "b": [[.85, .10, .05], [.10, .80, .10]],    # the passes disagree: BALD
    "e": [[.70, .25, .05]] * 2,                 # confident
}
MEASURES = {k: v.numpy() for k, v in verbalizer_uncertainty(torch.tensor(list(PROBS.values()), dtype=torch.float64)).items()}
MEASURES["pe"] = -np.log(MEASURES["probs"].max(-1))


def rng(seed=0):
    return np.random.default_rng(seed)


def rank_by(name, b=5):
    """The strategy `name` fed the column it asks for, as the loop does."""
    strategy = get_strategy(name)
    scores = strategy.acquisition(RoundScores(5, u_lora=MEASURES[strategy.measure], adapter=0), rng())
    return select(list(PROBS), scores, b, rng(1))


@pytest.mark.parametrize("name,expected", [
    ("entropy", ["x", "w", "y", "b", "e"]),
    ("least_confidence", ["w", "x", "y", "b", "e"]),
    ("pe", ["w", "x", "y", "b", "e"]),  # -log max p: the same order as least confidence, other values
    ("margin", ["y", "w", "b", "x", "e"]),
])
def test_each_measure_strategy_ranks_by_its_own_measure(name, expected):
    assert rank_by(name) == expected


def test_bald_picks_the_example_whose_passes_disagree():
    assert rank_by("bald", 1) == ["b"]


def test_measure_strategies_are_not_aliases():
    firsts = {name: rank_by(name, 1)[0] for name in ("entropy", "least_confidence", "margin", "bald")}
    assert len(set(firsts.values())) == 4, firsts


def test_each_strategy_names_its_own_column():
    assert {n: get_strategy(n).measure for n in ("entropy", "pe", "least_confidence", "margin", "bald")} == {
        "entropy": "entropy", "pe": "pe", "least_confidence": "least_confidence", "margin": "margin", "bald": "bald"}
    assert get_strategy("entropy", "generation").measure == "me"
    assert get_strategy("star", "verbalizer", "margin").measure == "margin"
    assert get_strategy("star", "generation").measure == "pe"
    assert get_strategy("random").measure is None


def pick(name, b, adapter=0, **kw):
    strategy = get_strategy(name, **kw)
    scores = strategy.acquisition(RoundScores(5, U_BASE, U_LORA, adapter), rng())
    return select(IDS, scores, b, rng(1))


def test_star_follows_the_lambda_schedule_indexed_by_adapter():
    # adapter 0 (round 1) -> λ = 0.1: mostly the base model -> a (0.9), e (0.695), c (0.49)
    assert get_strategy("star").weight(0) == pytest.approx(0.1)
    assert pick("star", 3, adapter=0) == ["a", "e", "c"]
    # adapter 9 -> λ = 1.0: only the adapter
    assert pick("star", 3, adapter=9) == ["d", "b", "c"]
    # λ = 0.5: (1+0)/2=.5, (0+.8)/2=.4, (.5+.4)/2=.45, (.25+1)/2=.625, (.75+.2)/2=.475
    assert pick("star", 5, schedule=LambdaSchedule(values=(0.5,))) == ["d", "a", "e", "c", "b"]


def test_star_scores_by_hand():
    s = Star("entropy", LambdaSchedule(values=(0.3,))).acquisition(RoundScores(5, U_BASE, U_LORA, 0), rng())
    expected = 0.3 * np.array([0, 0.8, 0.4, 1, 0.2]) + 0.7 * np.array([1, 0, 0.5, 0.25, 0.75])
    assert s == pytest.approx(expected)


def test_subtract_prefers_what_the_adapter_made_less_sure():
    # norm(u_lora) - norm(u_base): -1, .8, -.1, .75, -.55
    assert pick("subtract", 2) == ["b", "d"]


def test_random_needs_no_scores_and_is_seeded():
    random = get_strategy("random")
    assert not random.uses_lora and not random.uses_base
    a = select(IDS, random.acquisition(RoundScores(5), rng(5)), 3, rng(1))
    b = select(IDS, random.acquisition(RoundScores(5), rng(5)), 3, rng(1))
    c = select(IDS, random.acquisition(RoundScores(5), rng(6)), 3, rng(1))
    assert a == b and a != c


def test_ties_break_by_seeded_random():
    ties = np.array([1.0, 1.0, 1.0, 0.0, 1.0])
    first = select(IDS, ties, 2, rng(3))
    assert first == select(IDS, ties, 2, rng(3))
    assert set(first) <= {"a", "b", "c", "e"}
    orders = {tuple(select(IDS, ties, 4, rng(s))) for s in range(20)}
    assert len(orders) > 1 and all("d" not in o for o in orders)  # ties reorder; the lower score never wins


def test_select_caps_at_the_pool_and_rejects_bad_input():
    assert sorted(select(IDS, U_LORA, 10, rng())) == sorted(IDS)
    with pytest.raises(ValueError, match="NaN"):
        select(IDS, np.array([0.1, np.nan, 0, 0, 0]), 2, rng())
    with pytest.raises(ValueError, match="strategy"):
        get_strategy("oracle")


def test_measure_columns():
    assert measure_column("verbalizer", "auto") == "entropy"
    assert measure_column("generation", "auto") == "pe"
    assert measure_column("generation", "entropy") == "me"
    with pytest.raises(ValueError, match="not available for a generation task"):
        measure_column("generation", "bald")


@pytest.mark.parametrize("overrides,message", [
    (["al.strategy=bald", "al.measure=entropy"], "al.measure=entropy has no effect with al.strategy=bald"),
    (["al.strategy=star", "al.measure=bald"], "BALD is 0 everywhere"),
    (["al.strategy=subtract", "al.measure=bald"], "BALD is 0 everywhere"),
    (["al.strategy=bald", "scoring.mc_passes=1"], "al.strategy=bald needs scoring.mc_passes >= 2"),
    (["al.strategy=bald", "al.initial=base_uncertainty"], "al.initial=base_uncertainty cannot rank by BALD"),
    (["task.name=gsm8k", "al.strategy=margin"], "al.strategy=margin needs a class distribution"),
    (["task.name=gsm8k", "al.strategy=star", "al.measure=bald"], "al.measure=bald needs a class distribution"),
    (["task.name=custom", "task.kind=generation", "al.strategy=bald"], "al.strategy=bald needs a class distribution"),
])
def test_meaningless_strategy_combinations_are_config_errors(overrides, message):
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["al.strategy=bald"], ["al.strategy=bald", "al.measure=bald"], ["al.strategy=star", "al.measure=margin"],
    ["task.name=gsm8k", "al.strategy=pe"], ["task.name=gsm8k", "al.strategy=star"], ["al.strategy=random"],
])
def test_sensible_combinations_load(overrides):
    from pipeline.config import load_config

    load_config(None, overrides)


def test_top_positions_are_the_b_best_with_random_tie_order():
    """Only the rows at or above the b-th score are sorted; the result is still the b best, best first."""
    from pipeline.strategies import top_positions

    gen = np.random.default_rng(0)
    for trial in range(50):
        scores = gen.integers(0, 5, size=int(gen.integers(1, 40))).astype(float)  # many ties
        b = int(gen.integers(0, 45))
        top = top_positions(scores, b, rng(trial))
        assert len(top) == min(b, len(scores)) and len(set(top.tolist())) == len(top)
        assert scores[top].tolist() == sorted(scores, reverse=True)[:len(top)]
    ties = np.zeros(6)
    assert len({tuple(top_positions(ties, 2, rng(s))) for s in range(20)}) > 1  # ties broken by the seed
    assert top_positions(ties, 2, rng(3)).tolist() == top_positions(ties, 2, rng(3)).tolist()
