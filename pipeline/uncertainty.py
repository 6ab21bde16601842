"""Label-free uncertainty measures, normalisation and STAR's dynamic combination.

Pure torch, no model and no labels: every function takes model outputs only. Higher always means more
uncertain, so a strategy can rank any of them the same way.

Shapes:
  probs        (N, T, C)  class probabilities over the verbalizer tokens, T Monte-Carlo passes
  token_logits (N, L, V)  logits at the answer positions of a teacher-forced pass
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    if probs.dim() != 3:
        raise ValueError(f"probs should have shape (N, T, C), got {tuple(probs.shape)}")
    return probs.double()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(_EPS))).sum(-1)


def entropy_of_mean(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the MC-averaged predictive distribution (max-entropy, "ME"), in nats."""
    return _entropy(_check_probs(probs).mean(1))


def bald(probs: torch.Tensor) -> torch.Tensor:
    """Mutual information between prediction and weights: H[mean p] - mean H[p]. Zero when passes agree."""
    p = _check_probs(probs)
    return (_entropy(p.mean(1)) - _entropy(p).mean(1)).clamp_min(0.0)


def least_confidence(probs: torch.Tensor) -> torch.Tensor:
    """1 - max_c mean p(c)."""
    return 1.0 - _check_probs(probs).mean(1).max(-1).values


def margin(probs: torch.Tensor) -> torch.Tensor:
    """1 - (p_top1 - p_top2) of the mean distribution; 1 when the top two tie, 0 when one class has all mass."""
    p = _check_probs(probs).mean(1)
    if p.shape[-1] < 2:
        raise ValueError(f"margin needs at least 2 classes, got {p.shape[-1]}")
    top2 = p.topk(2, dim=-1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def token_nll_and_entropy(
    token_logits: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean NLL of `token_ids` and mean entropy of the full-vocabulary distribution.

    `token_logits[n, i]` is the distribution that predicted `token_ids[n, i]`; `mask` marks real answer
    tokens. Used on the model's own greedy answer (never the gold one), teacher-forced.
    """
    logp = torch.log_softmax(token_logits.float(), dim=-1)
    nll = -logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    m = mask.to(logp.dtype)
    n = m.sum(-1).clamp_min(1.0)
    return (nll * m).sum(-1) / n, (ent * m).sum(-1) / n


def generation_uncertainty(nll_per_pass: torch.Tensor, entropy_per_pass: torch.Tensor) -> dict[str, torch.Tensor]:
    """Average (N, T) per-pass token statistics over the T passes into PE and ME."""
    pe = nll_per_pass.double().mean(1)
    return {"pe": pe, "me": entropy_per_pass.double().mean(1), "confidence": torch.exp(-pe)}


def verbalizer_uncertainty(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every classification measure from one (N, T, C) tensor, plus the mean probabilities."""
    return {
        "entropy": entropy_of_mean(probs),
        "bald": bald(probs),
        "least_confidence": least_confidence(probs),
        "margin": margin(probs),
        "probs": _check_probs(probs).mean(1),
    }


def minmax_normalize(u: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] over the pool. A constant pool maps to zeros (no example is more uncertain)."""
    u = u.double()
    lo, hi = u.min(), u.max()
    if hi - lo <= 0:
        return torch.zeros_like(u)
    return (u - lo).div_(hi - lo)  # one new tensor: a pool-sized temporary less


def dynamic_score(u_lora: torch.Tensor, u_base: torch.Tensor, lam: float) -> torch.Tensor:
    """STAR: s = λ·norm(u_lora) + (1-λ)·norm(u_base), both min-max normalised over the same pool."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda should be in [0, 1], got {lam}")
    if u_lora.shape != u_base.shape:
        raise ValueError(f"u_lora and u_base should have the same shape, got {tuple(u_lora.shape)} and {tuple(u_base.shape)}")
    # in place on the fresh normalised tensors: two pool-sized tensors at a time, not five
    return minmax_normalize(u_lora).mul_(lam).add_(minmax_normalize(u_base), alpha=1.0 - lam)


@dataclass(frozen=True)
class LambdaSchedule:
    """λ_k = clip(start + step·k, 0, max). The paper's default is 0.1·(k+1) capped at 1.

    `values`, when given, lists λ per round explicitly; rounds past its end reuse the last value.
    """

    start: float = 0.1
    step: float = 0.1
    max: float = 1.0
    values: tuple[float, ...] = ()

    def __post_init__(self):
        for v in self.values:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"lambda schedule values should be in [0, 1], got {v}")
        if not 0.0 <= self.max <= 1.0:
            raise ValueError(f"lambda schedule max should be in [0, 1], got {self.max}")

    def __call__(self, round: int) -> float:
        if round < 0:
            raise ValueError(f"round should be >= 0, got {round}")
        if self.values:
            return float(self.values[min(round, len(self.values) - 1)])
        return float(min(self.max, max(0.0, self.start + self.step * round)))
