"""Uncertainty measures on hand-built probabilities and logits, against values computed by hand."""
import math

import pytest
import torch

from pipeline.uncertainty import (
    LambdaSchedule,
    bald,
    dynamic_score,
    entropy_of_mean,
    least_confidence,
    margin,
    minmax_normalize,
    token_nll_and_entropy,
    verbalizer_uncertainty,
)

LN2 = math.log(2)
H_09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))  # entropy of (0.9, 0.1) = 0.325083


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_uniform_and_certain_binary():
    probs = t([[[0.5, 0.5]], [[1.0, 0.0]]])  # (N=2, T=1, C=2)
    assert entropy_of_mean(probs).tolist() == pytest.approx([LN2, 0.0])
    assert least_confidence(probs).tolist() == pytest.approx([0.5, 0.0])
    assert margin(probs).tolist() == pytest.approx([1.0, 0.0])
    assert bald(probs).tolist() == pytest.approx([0.0, 0.0])


def test_bald_is_disagreement_between_passes():
    disagree = [[0.9, 0.1], [0.1, 0.9]]
    agree = [[0.5, 0.5], [0.5, 0.5]]
    probs = t([disagree, agree])  # both have mean (0.5, 0.5)
    assert entropy_of_mean(probs).tolist() == pytest.approx([LN2, LN2])
    assert bald(probs).tolist() == pytest.approx([LN2 - H_09, 0.0])
    assert bald(probs)[0].item() == pytest.approx(0.368064, abs=1e-6)


def test_three_classes():
    probs = t([[[0.5, 0.3, 0.2]]])
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert entropy_of_mean(probs).item() == pytest.approx(h)
    assert h == pytest.approx(1.029653, abs=1e-6)
    assert least_confidence(probs).item() == pytest.approx(0.5)
    assert margin(probs).item() == pytest.approx(0.8)


def test_measures_rank_the_same_way_on_a_clear_case():
    probs = t([[[0.99, 0.01]], [[0.7, 0.3]], [[0.55, 0.45]]])
    u = verbalizer_uncertainty(probs)
    for name in ("entropy", "least_confidence", "margin"):
        assert torch.argsort(u[name]).tolist() == [0, 1, 2], name
    assert u["probs"].shape == (3, 2)


def test_probs_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(N, T, C\)"):
        entropy_of_mean(t([0.5, 0.5]))


def test_token_nll_and_entropy_by_hand():
    # position 0: logits (0, 0) -> p = (.5, .5), target 0;  position 1: logits (ln 3, 0) -> p = (.75, .25), target 1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    targets = torch.tensor([[0, 1]])
    nll, ent = token_nll_and_entropy(logits, targets, torch.tensor([[1, 1]]))
    h_075 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert nll.item() == pytest.approx((LN2 + math.log(4)) / 2, abs=1e-6)
    assert ent.item() == pytest.approx((LN2 + h_075) / 2, abs=1e-6)
    nll, ent = token_nll_and_entropy(logits, targets, torch.tensor([[1, 0]]))  # padding is ignored
    assert nll.item() == pytest.approx(LN2, abs=1e-6)
    assert ent.item() == pytest.approx(LN2, abs=1e-6)


def test_minmax_normalize():
    assert minmax_normalize(t([1.0, 3.0, 5.0])).tolist() == [0.0, 0.5, 1.0]
    assert minmax_normalize(t([2.0, 2.0])).tolist() == [0.0, 0.0]


def test_dynamic_score_mixes_normalised_uncertainties():
    u_lora, u_base = t([0.0, 10.0, 5.0]), t([2.0, 0.0, 1.0])
    assert dynamic_score(u_lora, u_base, 0.3).tolist() == pytest.approx([0.7, 0.3, 0.5])
    assert dynamic_score(u_lora, u_base, 0.0).tolist() == pytest.approx([1.0, 0.0, 0.5])
    assert dynamic_score(u_lora, u_base, 1.0).tolist() == pytest.approx([0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="lambda"):
        dynamic_score(u_lora, u_base, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        dynamic_score(u_lora, u_base[:2], 0.5)


def test_lambda_schedule():
    paper = LambdaSchedule()
    assert [paper(k) for k in (0, 1, 4, 9, 20)] == pytest.approx([0.1, 0.2, 0.5, 1.0, 1.0])
    explicit = LambdaSchedule(values=(0.2, 0.5))
    assert [explicit(k) for k in (0, 1, 5)] == [0.2, 0.5, 0.5]
    assert LambdaSchedule(start=0.0, step=0.25, max=0.6)(3) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="values"):
        LambdaSchedule(values=(0.2, 1.5))
    with pytest.raises(ValueError, match="round"):
        paper(-1)
