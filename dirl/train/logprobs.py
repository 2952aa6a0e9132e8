"""Log-probabilities of chosen tokens from hidden states, without ever holding all N x V logits.

Used by the SFT loss (cross-entropy = -log p) and by the RL trainer (step-level log-probs). Always
computed in fp32 (SPEC section 11: bf16 log-probs and ratios are one of the original code's defects).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, temperature: float):
    logits = torch.nn.functional.linear(h, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    return picked - lse


def _chunk_logprobs_entropy(h, weight, bias, targets, temperature: float):
    logits = torch.nn.functional.linear(h, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), ent


def token_logprobs(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    return_entropy: bool = False,
):
    """``log softmax(lm_head(hidden) / T)[target]`` for ``hidden [N, H]`` and ``targets [N]``, fp32.

    Rows are processed ``chunk_size`` at a time; under autograd each chunk is recomputed in the
    backward pass (activation checkpointing), so peak memory holds one chunk of logits, not N x V.
    With ``return_entropy`` also returns the entropy of each row's distribution (detached use only).
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"expected hidden [N, H] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    n = hidden.shape[0]
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if return_entropy else empty
    targets = targets.long()
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) and n > chunk_size
    outs, ents = [], []
    for s in range(0, n, chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if return_entropy:
            lp, ent = _chunk_logprobs_entropy(h, weight, bias, t, temperature)
            ents.append(ent.detach())
        elif use_ckpt:
            lp = checkpoint(_chunk_logprobs, h, weight, bias, t, temperature, use_reentrant=False)
        else:
            lp = _chunk_logprobs(h, weight, bias, t, temperature)
        outs.append(lp)
    lp = torch.cat(outs)
    return (lp, torch.cat(ents)) if return_entropy else lp
