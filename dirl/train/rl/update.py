"""The update of an RL step: samples with group advantages, their split into mini- and
micro-batches, the no-grad log-prob pass (old and reference log-probs), and one optimizer step per
mini-batch with the DiPO loss. Step-level log-probs come from :mod:`dirl.train.layouts` (packed
layout by default), the loss from :mod:`dirl.train.dipo`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch

from dirl.train.common import Dist, GradientStepper
from dirl.train.dipo import LossStats, dipo_token_loss, group_advantages, token_weights
from dirl.train.layouts import ScoredBatch, build_batch, score_batch
from dirl.train.rl.config import LossConfig
from dirl.train.rl.groups import Group

Behaviour = Literal["current", "old", "rollout"]


@dataclass
class Sample:
    """One response to train on."""

    traj: dict
    advantage: float
    group: int
    n_scored: int  # tokens that take a loss
    old: Optional[torch.Tensor] = None  # per token_ids entry (NaN where unscored)
    ref: Optional[torch.Tensor] = None


def scored_count(traj: dict, score_after_eos: bool) -> int:
    n = len(traj["token_ids"])
    return n if score_after_eos else min(n, int(traj.get("response_length", n)))


def make_samples(groups: Sequence[Group], scale_by_std: bool = True, score_after_eos: bool = False) -> list[Sample]:
    """One sample per response, with its group advantage (population std; 0 for a flat group)."""
    out = []
    for gi, g in enumerate(groups):
        adv = group_advantages(g.rewards, len(g.rewards), scale_by_std=scale_by_std).tolist()
        for t, a in zip(g.trajectories, adv):
            out.append(Sample(t, float(a), gi, scored_count(t, score_after_eos)))
    return out


def behaviour_policy(loss: LossConfig, num_iterations: int, num_mini_batches: int, staleness: int = 0) -> Behaviour:
    """Whose log-probs the ratio divides by: the recorded ones (``rollout``; always with stale
    rollouts), the current policy's own (``current``: one on-policy update per batch, ratio 1) or a
    pre-pass's (``old``)."""
    if loss.behaviour_logprobs == "rollout" or (staleness > 0 and loss.behaviour_logprobs == "auto"):
        return "rollout"
    return "current" if num_iterations == 1 and num_mini_batches == 1 else "old"


# --------------------------------------------------------------------------------------------
# Mini- and micro-batches
# --------------------------------------------------------------------------------------------


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges covering ``range(n)``, sizes differing by at most 1."""
    base, extra = divmod(n, parts)
    out, s = [], 0
    for i in range(parts):
        e = s + base + (1 if i < extra else 0)
        out.append((s, e))
        s = e
    return out


def micro_batches_per_rank(capacity: int, num_mini_batches: int, world: int, micro_batch_size: int) -> int:
    """Micro-batches per optimizer step on each rank for a step of at most ``capacity`` responses."""
    per_mini = math.ceil(capacity / num_mini_batches)
    per_rank = math.ceil(per_mini / world)
    return max(1, math.ceil(per_rank / micro_batch_size))


def plan_micro_batches(n_samples: int, num_mini_batches: int, rank: int, world: int,
                       n_micro: int) -> list[list[list[int]]]:
    """For each mini-batch, this rank's micro-batches (lists of sample indices; some may be empty).
    Mini-batches are contiguous, each split evenly over ranks, each rank's share over ``n_micro``."""
    plan = []
    for a, b in split_even(n_samples, num_mini_batches):
        ra, rb = split_even(b - a, world)[rank]
        share = list(range(a + ra, a + rb))
        plan.append([share[s:e] for s, e in split_even(len(share), n_micro)])
    return plan


@dataclass
class BatchSettings:
    """How samples become scored batches (layouts) and log-probs (temperature, chunking)."""

    block_size: int
    mask_id: int
    pad_id: int
    layout: str
    score_after_eos: bool
    temperature: float
    chunk_size: int
    device: Any
    row_tokens: int = 0


def make_batch(samples: Sequence[Sample], s: BatchSettings) -> ScoredBatch:
    """The scored batch of ``samples``; with none, a one-token batch with one scored position that
    keeps every rank's micro-batch count equal (its loss is multiplied by 0)."""
    if not samples:
        return build_batch([{"prompt_ids": [], "token_ids": [0], "step_map": [1], "response_length": 1}],
                           s.block_size, 0)
    return build_batch([x.traj for x in samples], s.block_size, s.mask_id, s.layout, s.score_after_eos,
                       row_tokens=s.row_tokens, pad_id=s.pad_id)


def _per_token(batch: ScoredBatch, values: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Gather per-sample per-token values (``values[i][k]``) in the batch's scored order."""
    return torch.stack([values[int(i)][int(k)] for i, k in zip(batch.traj, batch.tok)]) if batch.num_scored \
        else torch.zeros(0)


def new_measure() -> dict:
    """Sums for the mismatch (trainer vs engine log-probs) and entropy metrics."""
    return {"mis_sum": 0.0, "mis_max": 0.0, "mis_n": 0, "ent_sum": 0.0, "ent_n": 0}


def _scatter(sub: list[Sample], batch: ScoredBatch, lp: torch.Tensor, attr: str) -> None:
    for x in sub:
        setattr(x, attr, torch.full((len(x.traj["token_ids"]),), float("nan")))
    for i, k, v in zip(batch.traj.tolist(), batch.tok.tolist(), lp.tolist()):
        getattr(sub[i], attr)[k] = v


def _mismatch(acc: dict, sub: list[Sample], batch: ScoredBatch, lp: torch.Tensor) -> None:
    rec, ok = [], []
    for i, k in zip(batch.traj.tolist(), batch.tok.tolist()):
        r = sub[i].traj.get("logprobs")
        if r is None or k >= len(r) or r[k] is None:
            ok.append(False)
            rec.append(0.0)
        else:
            ok.append(True)
            rec.append(float(r[k]))
    if not any(ok):
        return
    m = torch.tensor(ok)
    d = (lp - torch.tensor(rec))[m].abs()
    acc["mis_sum"] += float(d.sum())
    acc["mis_max"] = max(acc["mis_max"], float(d.max()))
    acc["mis_n"] += int(d.numel())


def _entropy(acc: dict, ent: Optional[torch.Tensor]) -> None:
    if ent is not None:
        acc["ent_sum"] += float(ent.sum())
        acc["ent_n"] += int(ent.numel())


@torch.no_grad()
def prepass(scorer, ref_model, samples: list[Sample], plan: list[list[list[int]]], s: BatchSettings,
            want_old: bool, want_ref: bool, entropy: bool) -> dict:
    """No-grad log-prob pass over this rank's samples before any update of the step: stores
    ``sample.old`` (policy) and ``sample.ref`` (reference model). Returns the mismatch and entropy
    sums (:func:`new_measure`) over every token it scored with the policy."""
    acc = new_measure()
    for mini in plan:
        for micro in mini:
            if not micro:
                continue
            sub = [samples[i] for i in micro]
            batch = make_batch(sub, s)
            dev = batch.to(s.device)
            if want_old:
                lp, ent = score_batch(scorer, dev, s.temperature, s.chunk_size, with_entropy=entropy)
                lp = lp.float().cpu()
                _scatter(sub, batch, lp, "old")
                _mismatch(acc, sub, batch, lp)
                _entropy(acc, ent)
            if want_ref:
                lr, _ = score_batch(ref_model, dev, s.temperature, s.chunk_size)
                _scatter(sub, batch, lr.float().cpu(), "ref")
    return acc


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def update(wrapped, stepper: GradientStepper, samples: list[Sample], mini_plan: list[list[int]], s: BatchSettings,
           loss: LossConfig, dist: Dist, behaviour: Behaviour, measure: Optional[dict] = None,
           entropy: bool = False) -> dict:
    """Forward/backward of one mini-batch's micro-batches on this rank and one optimizer step.

    Normalisers count the whole mini-batch on every rank: responses with at least one scored token
    (``grpo``) or scored tokens (``dapo``). ``behaviour``: ``current`` (ratio 1: detached current
    log-probs), ``old`` (``sample.old`` from the pre-pass) or ``rollout`` (recorded log-probs).
    ``measure`` (when given) collects mismatch sums from these forwards, and entropy with ``entropy``.
    """
    local = [samples[i] for micro in mini_plan for i in micro]
    n_resp = sum(1 for x in local if x.n_scored > 0)
    n_tok = sum(x.n_scored for x in local)
    tot_resp, tot_tok = dist.sum([n_resp, n_tok])
    stats = LossStats()
    loss_sum = 0.0
    fwd_tokens = 0
    fwd_time = 0.0
    for mi, micro in enumerate(mini_plan):
        sub = [samples[i] for i in micro]
        batch = make_batch(sub, s)
        fwd_tokens += batch.num_tokens if sub else 0
        with stepper.accumulate(mi):
            t0 = time.perf_counter()
            lp, ent = wrapped(batch.to(s.device), temperature=s.temperature, chunk_size=s.chunk_size,
                              with_entropy=measure is not None and entropy and bool(sub))
            lp = lp.float()
            _sync(s.device)
            fwd_time += time.perf_counter() - t0
            if not sub or batch.num_scored == 0 or tot_resp == 0:
                stepper.backward(lp.sum() * 0.0)
                continue
            if behaviour == "current":
                old = lp.detach()
            elif behaviour == "old":
                old = _per_token(batch, [x.old for x in sub]).to(lp.device)
            else:
                old = _per_token(batch, [torch.tensor(x.traj["logprobs"], dtype=torch.float32) for x in sub]).to(lp.device)
            adv = torch.tensor([x.advantage for x in sub], dtype=torch.float32)[batch.traj].to(lp.device)
            ref = _per_token(batch, [x.ref for x in sub]).to(lp.device) if loss.beta > 0 else None
            tl, st = dipo_token_loss(lp, old, adv, loss.epsilon, loss.epsilon_high, loss.beta, ref,
                                     log_ratio_clamp=loss.log_ratio_clamp)
            counts = torch.bincount(batch.traj, minlength=len(sub))
            w = token_weights(batch.traj, counts, loss.loss_type, tot_resp, max(tot_tok, 1.0)).to(lp.device)
            mb_loss = (tl * w).sum()
            stepper.backward(mb_loss)
        loss_sum += float(mb_loss.detach())
        stats = stats.add(st)
        if measure is not None:
            _mismatch(measure, sub, batch, lp.detach().cpu())
            _entropy(measure, ent)
    out = stepper.step()
    sums = dist.sum([loss_sum, stats.clipped, stats.tokens, stats.kl, stats.ratio, fwd_tokens,
                     stats.ratio_clamped, stats.kl_clamped])
    out.update({
        "loss": sums[0], "clip_fraction": sums[1] / max(sums[2], 1.0), "kl": sums[3] / max(sums[2], 1.0),
        "ratio_mean": sums[4] / max(sums[2], 1.0), "ratio_max": dist.max(stats.ratio_max),
        "ratio_min": -dist.max(-stats.ratio_min),  # inf: no scored token on any rank
        "ratio_clamped": sums[6], "kl_clamped": sums[7],
        "scored_tokens": sums[2], "forward_tokens": sums[5], "responses": tot_resp, "forward_s": fwd_time,
    })
    return out
