"""The DiPO objective (SPEC section 6): group advantages, DAPO's group filter, the clipped
surrogate with a k3 KL term, and the two aggregations with mini-batch-wide normalisers.

Everything here is a plain function of tensors, so each piece is checked alone against numbers
worked out by hand. The trainer (:mod:`dirl.train.rl.update`) strings them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

Aggregation = Literal["grpo", "dapo"]


# --------------------------------------------------------------------------------------------
# Advantages and the group filter
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: Sequence[float] | torch.Tensor, group_size: int, scale_by_std: bool = True,
                     ) -> torch.Tensor:
    """A_i = (r_i - mean) / std within consecutive groups of ``group_size`` (population std).

    A group whose rewards are all equal (std == 0, up to rounding) gets A = 0 for every response.
    With ``scale_by_std=False`` the advantage is r_i - mean (Dr. GRPO's variant).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if group_size <= 0 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    centred = g - mean
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    flat = std <= 1e-9 * torch.clamp(mean.abs(), min=1.0)
    adv = centred / torch.where(flat, torch.ones_like(std), std) if scale_by_std else centred
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.flatten().float()


def keep_group(correct: Sequence[float] | torch.Tensor) -> bool:
    """DAPO dynamic sampling: keep a group iff 0 < mean(correct) < 1 (some right, some wrong)."""
    c = torch.as_tensor(correct, dtype=torch.float64)
    m = float(c.mean()) if c.numel() else 0.0
    return 0.0 < m < 1.0


def keep_groups(correct: Sequence[float] | torch.Tensor, group_size: int) -> list[bool]:
    c = torch.as_tensor(correct, dtype=torch.float64).flatten()
    if c.numel() % group_size:
        raise ValueError(f"{c.numel()} correctness flags do not split into groups of {group_size}")
    return [keep_group(row) for row in c.view(-1, group_size)]


# --------------------------------------------------------------------------------------------
# The token loss
# --------------------------------------------------------------------------------------------


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - l) - (ref - l) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@dataclass
class LossStats:
    """Detached sums over the tokens of one call, to be summed over micro-batches and ranks."""

    tokens: float = 0.0
    clipped: float = 0.0
    kl: float = 0.0
    ratio: float = 0.0
    ratio_max: float = 0.0
    ratio_min: float = math.inf

    def add(self, other: "LossStats") -> "LossStats":
        return LossStats(self.tokens + other.tokens, self.clipped + other.clipped, self.kl + other.kl,
                         self.ratio + other.ratio, max(self.ratio_max, other.ratio_max),
                         min(self.ratio_min, other.ratio_min))


def dipo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    eps_low: float = 0.2, eps_high: float = 0.28, beta: float = 0.0,
                    ref_logp: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, LossStats]:
    """Per-token loss -(min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - beta * KL), and stats.

    ``advantages`` is per token (a response's advantage repeated over its tokens).
    """
    old_logp = old_logp.detach().to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    loss = -surrogate
    kl_sum = 0.0
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = k3_kl(logp, ref_logp.detach().to(logp.dtype))
        loss = loss + beta * kl
        kl_sum = float(kl.detach().sum())
    with torch.no_grad():
        r = ratio.detach()
        is_clipped = ((adv > 0) & (r > 1.0 + eps_high)) | ((adv < 0) & (r < 1.0 - eps_low))
        n = r.numel()
        stats = LossStats(tokens=float(n), clipped=float(is_clipped.sum()), kl=kl_sum, ratio=float(r.sum()),
                          ratio_max=float(r.max()) if n else 0.0, ratio_min=float(r.min()) if n else math.inf)
    return loss, stats


# --------------------------------------------------------------------------------------------
# Aggregation with mini-batch-wide normalisers
# --------------------------------------------------------------------------------------------


def token_weights(response_index: torch.Tensor, response_tokens: torch.Tensor, aggregation: Aggregation,
                  total_responses: float, total_tokens: float) -> torch.Tensor:
    """Weight of each scored token so that sum(weight * token_loss) over the whole mini-batch (all
    micro-batches, all ranks) is the chosen aggregate.

    ``response_index[k]``: which response token k belongs to; ``response_tokens[i]``: how many scored
    tokens response i has (all of them sit in the same micro-batch). ``grpo``: mean over each
    response's tokens, then mean over the ``total_responses`` responses of the mini-batch;
    ``dapo``: sum over tokens / ``total_tokens``.
    """
    if aggregation == "grpo":
        n = response_tokens.to(torch.float64)[response_index]
        return (1.0 / (n * float(total_responses))).float()
    if aggregation == "dapo":
        return torch.full(response_index.shape, 1.0 / float(total_tokens), dtype=torch.float32)
    raise ValueError(f"unknown aggregation {aggregation!r} (expected grpo or dapo)")


def aggregate(token_loss: torch.Tensor, response_index: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """The aggregate of one self-contained batch (every response complete, nothing elsewhere)."""
    counts = torch.bincount(response_index)
    present = counts > 0
    w = token_weights(response_index, counts, aggregation, total_responses=int(present.sum()),
                      total_tokens=int(response_index.numel()))
    return (token_loss * w.to(token_loss.dtype)).sum()
