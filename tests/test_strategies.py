"""Selection strategies on hand-made scores, with exact expected ids."""
import numpy as np
import pytest

from pipeline.strategies import Star, get_strategy, measure_column, select
from pipeline.uncertainty import LambdaSchedule

IDS = ["a", "b", "c", "d", "e"]
U_BASE = np.array([0.9, 0.1, 0.5, 0.3, 0.7])  # normalised: 1, 0, .5, .25, .75
U_LORA = np.array([0.0, 0.8, 0.4, 1.0, 0.2])  # normalised: 0, .8, .4, 1, .2


def rng(seed=0):
    return np.random.default_rng(seed)


def pick(name, b, round=1, **kw):
    strategy = get_strategy(name, **kw)
    scores = strategy.acquisition(U_BASE, U_LORA, round, rng())
    return select(IDS, scores, b, rng(1))


@pytest.mark.parametrize("name", ["entropy", "pe", "least_confidence", "margin", "bald"])
def test_uncertainty_strategies_rank_by_the_adapter(name):
    assert pick(name, 3) == ["d", "b", "c"]


def test_star_follows_the_lambda_schedule():
    # λ_0 = 0.1: mostly the base model -> a (0.9), e (0.695), c (0.49)
    assert pick("star", 3, round=0) == ["a", "e", "c"]
    # λ_9 = 1.0: only the adapter
    assert pick("star", 3, round=9) == ["d", "b", "c"]
    # λ = 0.5: (1+0)/2=.5, (0+.8)/2=.4, (.5+.4)/2=.45, (.25+1)/2=.625, (.75+.2)/2=.475
    assert pick("star", 5, round=0, schedule=LambdaSchedule(values=(0.5,))) == ["d", "a", "e", "c", "b"]


def test_star_scores_by_hand():
    s = Star(LambdaSchedule(values=(0.3,))).acquisition(U_BASE, U_LORA, 0, rng())
    expected = 0.3 * np.array([0, 0.8, 0.4, 1, 0.2]) + 0.7 * np.array([1, 0, 0.5, 0.25, 0.75])
    assert s == pytest.approx(expected)


def test_subtract_prefers_what_the_adapter_made_less_sure():
    # norm(u_lora) - norm(u_base): -1, .8, -.1, .75, -.55
    assert pick("subtract", 2) == ["b", "d"]


def test_random_is_seeded():
    a = select(IDS, get_strategy("random").acquisition(U_BASE, None, 0, rng(5)), 3, rng(1))
    b = select(IDS, get_strategy("random").acquisition(U_BASE, None, 0, rng(5)), 3, rng(1))
    c = select(IDS, get_strategy("random").acquisition(U_BASE, None, 0, rng(6)), 3, rng(1))
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
