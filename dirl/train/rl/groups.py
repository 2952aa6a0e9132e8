"""Groups of an RL step: G rollouts per prompt through the rollout client, their rewards, DAPO's
filter with refill rounds, the step's rollout metrics, and held-out accuracy through the same servers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from dirl.config import ConfigError, DecodingConfig
from dirl.data.benchmarks import load_benchmark
from dirl.data.chat import prompt_ids
from dirl.rewards.shaping import RewardConfig, score_trajectories, tokens_per_step
from dirl.rollout.requests import request_seed, sampling_request
from dirl.train.common import Dist, PhaseTimer
from dirl.train.dipo import keep_group


@dataclass
class Group:
    """One prompt and its G sampled responses, rewarded."""

    problem: dict
    prompt_ids: list[int]
    trajectories: list[dict]
    rewards: list[float]
    correct: list[bool]
    round: int = 0

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))


@dataclass
class Sampling:
    """What a rollout request needs besides its prompt: the decoding settings, the stop tokens, the
    base seed and the reward settings (with the model's block size, for length shaping)."""

    decoding: DecodingConfig
    stop_ids: list[int]
    seed: int
    rewards: RewardConfig
    block_size: int


def build_requests(prompts: Sequence[list[int]], G: int, step: int, rnd: int, s: Sampling) -> list[dict]:
    """G requests per prompt with ids ``s{step}-r{round}-p{slot}-g{j}`` (results are matched by id)."""
    return [sampling_request(f"s{step}-r{rnd}-p{slot}-g{j}", s.decoding, request_seed(s.seed, f"s{step}:r{rnd}:p{slot}", j),
                             input_ids=ids, stop_token_ids=s.stop_ids)
            for slot, ids in enumerate(prompts) for j in range(G)]


def check_results(requests: Sequence[dict], results: Sequence[dict]) -> None:
    """Every result answers its own request (same id, same prompt): a mix-up is an error, never a
    silently shifted reward."""
    if len(results) != len(requests):
        raise RuntimeError(f"rollout returned {len(results)} results for {len(requests)} requests")
    for q, r in zip(requests, results):
        if r.get("request_id") != q["request_id"]:
            raise RuntimeError(f"rollout result {r.get('request_id')!r} arrived in the place of {q['request_id']!r}")
        if list(r.get("prompt_ids") or []) != list(q["input_ids"]):
            raise RuntimeError(f"rollout result {q['request_id']!r} is for another prompt")
        if r.get("step_map") is None or len(r["step_map"]) != len(r.get("token_ids") or []):
            raise RuntimeError(f"rollout result {q['request_id']!r} has no step map aligned with its tokens "
                               "(the backend must report step maps for step-level log-probs)")


def rollout_and_score(client, problems: Sequence[dict], prompts: Sequence[list[int]], G: int, step: int, rnd: int,
                      s: Sampling, dist: Dist, timer: Optional[PhaseTimer] = None) -> list[Group]:
    """G rollouts per prompt and their rewards. With several ranks each generates and grades an
    interleaved share of the requests, then all ranks gather every group in the same order."""
    timer = timer or PhaseTimer()
    reqs = build_requests(prompts, G, step, rnd, s)
    mine = list(range(dist.rank, len(reqs), dist.world))
    local_reqs = [reqs[i] for i in mine]
    with timer("rollout"):
        results = client.generate(local_reqs) if local_reqs else []
        check_results(local_reqs, results)
    with timer("reward"):
        rewards: list[float] = []
        correct: list[bool] = []
        if results:
            b = score_trajectories(results, [problems[i // G]["answer"] for i in mine], s.rewards,
                                   max_length=s.decoding.max_new_tokens, block_size=s.block_size)
            rewards, correct = [float(x) for x in b.rewards], [bool(x) for x in b.correct]
    parts = dist.all_gather([(i, tr, rw, ok) for i, tr, rw, ok in zip(mine, results, rewards, correct)])
    by_index = {i: (tr, rw, ok) for part in parts for i, tr, rw, ok in part}
    groups = []
    for slot, (prob, ids) in enumerate(zip(problems, prompts)):
        items = [by_index[slot * G + j] for j in range(G)]
        groups.append(Group(prob, list(ids), [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], rnd))
    return groups


@dataclass
class CollectStats:
    rounds: int = 0
    drawn: int = 0
    skipped_long: int = 0
    dropped: int = 0  # groups dropped by the filter (flat: all correct or all wrong)
    surplus: int = 0  # kept groups beyond the target of the last round, not trained on
    all_groups: list = field(default_factory=list)  # every rewarded group of the step, kept or not


class FillError(ConfigError):
    """A step could not be filled with ``prompts_per_step`` groups of mixed correctness within the
    round bound: the run stops rather than train a short step (one line naming the keys to change)."""


def collect_groups(draw: Callable[[int], list[tuple[dict, list[int]]]],
                   generate: Callable[[list[dict], list[list[int]], int], list[Group]],
                   target: int, filter_groups: bool, max_rounds: int, oversample: float = 1.0,
                   keep: Optional[Callable[[Group], bool]] = None) -> tuple[list[Group], CollectStats]:
    """Groups for one step (``generate(problems, prompts, rnd=round)`` rolls out and rewards).
    Without filtering: one round of ``target`` prompts, all kept.
    With it (DiRL's GRPO and DAPO runs): a group is kept iff ``keep(group)`` (default
    0 < mean(correct) < 1: a flat group has zero advantages and only dilutes the average), and rounds
    of ``ceil(missing * oversample)`` prompts are drawn until exactly ``target`` groups are kept.
    After ``max_rounds`` rounds with fewer, :class:`FillError` (never a silently short step).
    Extra kept groups beyond ``target`` are dropped (their prompts were consumed all the same)."""
    keep = keep or (lambda g: keep_group(g.correct))
    stats = CollectStats()
    kept: list[Group] = []
    rolled = 0  # prompts rolled out (the source skips those over data.max_prompt_tokens)
    for rnd in range(max_rounds if filter_groups else 1):
        missing = target - len(kept)
        n = math.ceil(missing * oversample) if filter_groups else target
        drawn = draw(n)
        stats.drawn += n
        stats.rounds += 1
        if not drawn:
            continue
        rolled += len(drawn)
        groups = generate([d[0] for d in drawn], [d[1] for d in drawn], rnd=rnd)
        stats.all_groups += groups
        for g in groups:
            if not filter_groups or keep(g):
                kept.append(g)
            else:
                stats.dropped += 1
        if len(kept) >= target:
            break
    skipped = stats.drawn - rolled
    if len(kept) < target and (rolled == 0 or not filter_groups):  # the skipped prompts are the shortfall
        raise FillError(f"config key 'data.max_prompt_tokens': {skipped} of the {stats.drawn} prompts drawn were "
                        f"skipped as longer than it, leaving {len(kept)} of {target} groups for the step; raise "
                        f"data.max_prompt_tokens (0: no limit) or use shorter prompts")
    if len(kept) < target:
        also = f"; {skipped} of them were skipped as longer than data.max_prompt_tokens" if skipped else ""
        raise FillError(f"config key 'train.max_sampling_rounds': after {stats.rounds} sampling rounds "
                        f"({stats.drawn} prompts drawn{also}) only {len(kept)} of {target} groups have mixed "
                        f"correctness; raise train.max_sampling_rounds or train.oversample, or set "
                        f"train.filter_groups=false to train on flat groups too")
    stats.surplus = len(kept) - target
    return kept[:target], stats


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def rollout_metrics(stats: CollectStats, kept: Sequence[Group], target: int) -> dict:
    """Rollout metrics of one step, over every rewarded group (before filtering)."""
    gs = stats.all_groups
    trajs = [t for g in gs for t in g.trajectories]
    rew = [r for g in gs for r in g.rewards]
    cor = [float(c) for g in gs for c in g.correct]
    lens = [int(t["response_length"]) for t in trajs]
    tps = [v for v in (tokens_per_step(t.get("step_map"), t.get("response_length")) for t in trajs) if v]
    m = {
        "reward/mean": mean(rew),
        "reward/std": float(torch.tensor(rew).std(unbiased=False)) if rew else float("nan"),
        "accuracy": mean(cor),
        "groups/kept": len(kept),
        "groups/target": target,
        "groups/rewarded": len(gs),
        "groups/all_correct": sum(1 for g in gs if g.accuracy == 1.0),
        "groups/all_wrong": sum(1 for g in gs if g.accuracy == 0.0),
        "groups/dropped": stats.dropped,
        "groups/surplus": stats.surplus,
        "sampling/rounds": stats.rounds,
        "sampling/prompts_drawn": stats.drawn,
        "sampling/skipped_long_prompts": stats.skipped_long,
        "response_length/mean": mean(lens),
        "response_length/max": max(lens) if lens else 0,
        "response_length/truncated": mean([float(t.get("finish_reason") == "length") for t in trajs]),
        "decode/tokens_per_step": mean(tps),
        "tokens/generated": sum(len(t["token_ids"]) for t in trajs),
    }
    if kept:
        m["reward/kept_mean"] = mean([r for g in kept for r in g.rewards])
    return m


def evaluate_held_out(client, tok, benchmark: str, num_problems: int, num_samples: int, s: Sampling,
                      dist: Dist) -> dict:
    """Held-out accuracy and reward: ``num_samples`` responses per problem of ``benchmark`` with the
    training decoding settings (``s.seed``: the evaluation's own seed)."""
    probs = load_benchmark(benchmark, synthetic_size=num_problems, limit=num_problems)
    problems = [{"id": p["id"], "answer": p["answer"]} for p in probs]
    prompts = [prompt_ids(tok, p["prompt"]) for p in probs]
    groups = rollout_and_score(client, problems, prompts, num_samples, step=-1, rnd=0, s=s, dist=dist)
    corr = [c for g in groups for c in g.correct]
    rew = [r for g in groups for r in g.rewards]
    lens = [t["response_length"] for g in groups for t in g.trajectories]
    return {"eval/accuracy": sum(corr) / len(corr), "eval/reward": sum(rew) / len(rew),
            "eval/response_length": sum(lens) / len(lens), "eval/problems": len(groups)}
