"""Reinforcement learning for block diffusion LMs: DiPO (GRPO with step-level log-probs) and DAPO.

``dirl rl [CONFIG] [key=value ...]`` runs :func:`train_rl`. With no config it is the embedded
default: the newest quick-start SFT checkpoint under ``runs/`` (a fresh tiny model when there is
none), the synthetic arithmetic train split, reward = accuracy, one CPU process, a few minutes.
With a config (``configs/rl_sdar8b.yaml``, ``configs/rl_sdar8b_dapo.yaml``) under ``accelerate
launch`` it is the paper recipe on GPUs with DeepSpeed ZeRO-1 and LMDeploy rollout servers.

One RL step is a short list of calls, each a function of this module:

1. :func:`collect_groups`: draw prompts (seeded order, saved cursor) → rollouts through the
   :class:`~dirl.rollout.client.RolloutClient` (:func:`rollout_and_score`) → rewards → DAPO's
   filter (keep a group iff 0 < mean(correct) < 1) with refill rounds up to a cap; prompts drawn
   and dropped still advance the cursor;
2. :func:`make_samples`: group advantages (population std, 0 for a flat group);
3. :func:`plan_micro_batches`: mini-batches of the step, this rank's share, micro-batches (the
   same count on every rank);
4. :func:`prepass`: old log-probs (when more than one update per rollout batch), reference
   log-probs (β > 0), entropy and the train/inference mismatch, no gradient;
5. :func:`update`: per mini-batch, DiPO loss with normalisers over the whole mini-batch (all
   micro-batches, all ranks), one clipped optimizer step (:class:`~dirl.train.common.GradientStepper`);
6. :func:`push_weights`: the new weights to the rollout servers in place (sleep → update → wakeup).

Step-level log-probs come from :mod:`dirl.train.layouts` (packed layout by default) and the loss from
:mod:`dirl.train.dipo`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from dirl.config import (
    ConfigError,
    DecodingConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    check_block_sizes,
    check_decoding,
    check_model,
    check_path_exists,
    check_positive,
)
from dirl.rewards.shaping import RewardConfig
from dirl.train.common import DistConfig

# The user turn of DiRL's math prompts (SPEC section 9), for data.prompt_template.
MATH_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within $\\boxed{}$."

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class RLDataConfig:
    # "synthetic" (built-in arithmetic), a .json / .jsonl / .parquet file, or a `datasets` name
    # (local folder or Hub id, e.g. Auraithm/BigMath-RL)
    source: str = "synthetic"
    split: str = "train"
    subset: str = ""  # `datasets` configuration name
    question_key: str = ""  # "": the first of question, problem, prompt
    answer_key: str = ""  # "": the first of ground_truth_answer, answer, final_answer, solution
    # The user turn; {question} is replaced. The chat template is applied afterwards.
    prompt_template: str = "{question}"
    system_prompt: str = ""
    num_samples: int = 0  # 0: every row; synthetic: how many distinct train problems (0: all)
    digits: int = 2  # synthetic only
    max_prompt_tokens: int = 0  # 0: no limit; longer prompts are skipped (counted) when drawn
    seed: int = 0  # order of the prompts (a fresh permutation every epoch)


@dataclass
class RolloutConfig:
    backend: Literal["reference", "lmdeploy"] = "reference"
    # Servers to use. Empty: the trainer starts one server per rank (colocated) on the rank's device.
    urls: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    api_key: str = ""
    device: str = "auto"  # colocated servers: auto = the rank's device
    dtype: str = "auto"
    max_batch_size: int = 64  # sequences a server decodes together
    # torch CPU threads of a colocated server. None: 1 on a CPU device (tiny forwards run fastest on
    # one thread, and the trainer shares the cores), torch's choice elsewhere; 0: torch's choice.
    threads: Optional[int] = None
    max_concurrency: int = 8  # HTTP calls in flight per server
    request_batch_size: int = 16  # requests per HTTP call
    retries: int = 3
    timeout_s: float = 1800.0
    startup_timeout_s: float = 600.0
    weight_transport: Literal["auto", "file", "inline", "ipc"] = "auto"
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=40))


@dataclass
class LossConfig:
    aggregation: Literal["grpo", "dapo"] = "grpo"  # grpo: per-response mean, then mean; dapo: token mean
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    kl_beta: float = 0.0  # > 0 loads a frozen reference model (k3 estimator)
    scale_adv_by_std: bool = True
    # Behaviour policy of the ratio when it is not the current policy: "recompute" (the trainer's
    # log-probs before the step's first update) or "rollout" (the engine's recorded log-probs).
    behaviour_logprobs: Literal["recompute", "rollout"] = "recompute"
    score_after_eos: bool = False  # also train the tokens after the first stop token
    layout: Literal["packed", "rounds"] = "packed"
    logits_chunk_size: int = 4096


@dataclass
class RLTrainConfig:
    steps: int = 100
    prompts_per_step: int = 8  # groups trained on per step (num_task_per_step)
    samples_per_prompt: int = 8  # G
    mini_batches: int = 1  # optimizer steps per rollout batch (per iteration)
    num_iterations: int = 1  # passes over each rollout batch
    micro_batch_size: int = 64  # responses per forward on one rank
    # Tokens per packed row: the responses of a micro-batch sit side by side as separate documents
    # in rows of about this many tokens (a longer response gets a row of its own). 0: one row per
    # micro-batch (best with FlexAttention on GPU; on CPU the dense mask grows with the row squared).
    row_tokens: int = 512
    dynamic_sampling: bool = False  # DAPO filter
    max_sampling_rounds: int = 4  # refill rounds per step with dynamic sampling
    oversample: float = 1.0  # prompts drawn per round = ceil(missing groups * oversample)
    shuffle_samples: bool = True  # shuffle responses across mini-batches (when there are several)
    seed: int = 0
    save_every: int = 20  # 0: only the final checkpoint
    keep_last: int = 2
    resume: str = "auto"  # "auto": newest checkpoint of the run folder; "never"; or a checkpoint path
    entropy: bool = True  # log the policy entropy of the scored tokens


@dataclass
class RLEvalConfig:
    """Held-out accuracy during training (through the same servers); 0 disables it."""

    benchmark: str = "synthetic"  # a name known to dirl.data.benchmarks (synthetic: the held-out split)
    problems: int = 200
    samples: int = 2
    every: int = 0  # steps between evaluations (0: only before the first and after the last step)
    enabled: bool = True
    seed: int = 1234


@dataclass
class RLConfig:
    # model.path empty: the newest embedded-default SFT checkpoint under runs_dir, else a fresh tiny model
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    # extra reward functions, name -> "module:function" taking a dirl.rewards.RewardContext
    custom_rewards: dict[str, str] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, schedule="constant",
                                                                   warmup_steps=0, max_grad_norm=1.0))
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs"
    run_name: str = ""  # empty: rl-YYYYmmdd-HHMMSS
    runs_dir: str = "runs"  # where an empty model.path looks for the newest SFT checkpoint
    log_samples: bool = True  # RUN_DIR/samples.jsonl: per step, the drawn prompts and their rewards

    def validate(self) -> None:
        check_model(self.model)
        register_custom_rewards(self.custom_rewards)
        self.rewards.validate("rewards")
        dec = self.rollout.decoding
        check_decoding(dec, "rollout.decoding")
        check_block_sizes(self.model, dec, "rollout.decoding")
        check_positive("rollout.threads", self.rollout.threads, allow_zero=True)
        if dec.temperature <= 0 or not dec.do_sample:
            raise ConfigError("config key 'rollout.decoding.temperature': RL needs sampling (temperature > 0, "
                              "do_sample true); greedy rollouts have no sampling log-probs")
        t, lo = self.train, self.loss
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "mini_batches", "num_iterations",
                    "micro_batch_size", "max_sampling_rounds"):
            check_positive(f"train.{key}", getattr(t, key))
        check_positive("train.save_every", t.save_every, allow_zero=True)
        check_positive("train.row_tokens", t.row_tokens, allow_zero=True)
        check_positive("train.keep_last", t.keep_last, allow_zero=True)
        if t.oversample < 1.0:
            raise ConfigError(f"config key 'train.oversample': must be >= 1, got {t.oversample!r}")
        if t.samples_per_prompt < 2:
            raise ConfigError("config key 'train.samples_per_prompt': group advantages need at least 2 samples")
        if t.resume not in ("auto", "never", ""):
            check_path_exists("train.resume", t.resume)
        check_positive("loss.clip_eps_low", lo.clip_eps_low, allow_zero=True)
        check_positive("loss.clip_eps_high", lo.clip_eps_high, allow_zero=True)
        if lo.clip_eps_low >= 1.0:
            raise ConfigError(f"config key 'loss.clip_eps_low': must be < 1, got {lo.clip_eps_low!r}")
        check_positive("loss.kl_beta", lo.kl_beta, allow_zero=True)
        check_positive("loss.logits_chunk_size", lo.logits_chunk_size)
        check_positive("optim.lr", self.optim.lr)
        check_positive("logging.log_every", self.logging.log_every)
        check_positive("data.max_prompt_tokens", self.data.max_prompt_tokens, allow_zero=True)
        check_positive("data.num_samples", self.data.num_samples, allow_zero=True)
        if "{question}" not in self.data.prompt_template:
            raise ConfigError("config key 'data.prompt_template': must contain {question}")
        if self.data.source != "synthetic" and self.data.source.endswith((".json", ".jsonl", ".parquet")):
            check_path_exists("data.source", self.data.source)
        r = self.rollout
        if r.backend == "lmdeploy" and not r.urls and not torch.cuda.is_available():
            raise ConfigError("config key 'rollout.backend': lmdeploy servers need CUDA; use 'reference' on CPU "
                              "or give rollout.urls of running servers")
        for key in ("max_batch_size", "max_concurrency", "request_batch_size"):
            check_positive(f"rollout.{key}", getattr(r, key))
        check_positive("eval.problems", self.eval.problems)
        check_positive("eval.samples", self.eval.samples)
        check_positive("eval.every", self.eval.every, allow_zero=True)


def register_custom_rewards(custom: dict[str, str]) -> None:
    """Import ``module:function`` for each custom reward and register it under its name."""
    from dirl.rewards.shaping import register_reward

    for name, target in custom.items():
        mod, _, fn = target.partition(":")
        if not mod or not fn:
            raise ConfigError(f"config key 'custom_rewards.{name}': expected 'module:function', got {target!r}")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config key 'custom_rewards.{name}': cannot import {target!r}: {e}") from None
        register_reward(name, f)


def load_rl_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RLConfig:
    """The RL config of a YAML file plus ``key=value`` overrides, on top of the embedded defaults."""
    from dirl.train.common import load_run_config

    return load_run_config(RLConfig, path, overrides)


# --------------------------------------------------------------------------------------------
# Prompts: problems and a seeded, resumable order
# --------------------------------------------------------------------------------------------

_QUESTION_KEYS = ("question", "problem", "prompt")
_ANSWER_KEYS = ("ground_truth_answer", "answer", "final_answer", "gt_answer", "solution")


def _pick(row: dict, key: str, fallbacks: tuple[str, ...], what: str, where: str):
    keys = (key,) if key else fallbacks
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    raise ConfigError(f"data row {where}: no {what} field (looked for {', '.join(keys)}; "
                      f"set data.{what}_key); the row has {', '.join(sorted(map(str, row)))}")


def load_problems(data: RLDataConfig) -> list[dict]:
    """Problems as ``{"id", "question", "answer", "messages"}`` (answer: the gold string)."""
    from dirl.rewards.math import gold_answer

    if data.source == "synthetic":
        from dirl.data.synthetic import synthetic_problems

        rows = synthetic_problems(data.split, n=data.num_samples or None, seed=0, digits=data.digits)  # type: ignore[arg-type]
        where = f"synthetic[{data.split}]"
    else:
        p = Path(data.source)
        if p.is_file():
            from dirl.data.benchmarks import read_rows

            rows = read_rows(p)
        else:
            from dirl.data.formats import iter_hf_dataset

            rows = [r for _, r in iter_hf_dataset(data.source, data.split, data.subset or None)]
        if data.num_samples:
            rows = rows[:data.num_samples]
        where = data.source
    out = []
    for i, row in enumerate(rows):
        loc = f"{where} #{i}"
        q = str(_pick(row, data.question_key, _QUESTION_KEYS, "question", loc))
        gold = gold_answer(_pick(row, data.answer_key, _ANSWER_KEYS, "answer", loc))
        msgs = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
        msgs.append({"role": "user", "content": data.prompt_template.replace("{question}", q)})
        out.append({"id": str(row.get("id", i)), "index": i, "question": q, "answer": gold, "messages": msgs})
    if not out:
        raise ConfigError(f"config key 'data.source': '{data.source}' has no rows")
    return out


class PromptSampler:
    """A seeded order over ``n`` problems, a fresh permutation every epoch; the state is one cursor
    (how many prompts were drawn), so a resumed run draws exactly the prompts it would have drawn."""

    def __init__(self, n: int, seed: int = 0, cursor: int = 0):
        if n <= 0:
            raise ValueError("PromptSampler needs at least one problem")
        self.n, self.seed, self.cursor = int(n), int(seed), int(cursor)
        self._epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def peek(self, k: int, start: Optional[int] = None) -> list[int]:
        c = self.cursor if start is None else start
        return [self._order_of((c + i) // self.n)[(c + i) % self.n] for i in range(k)]

    def draw(self, k: int) -> list[int]:
        idx = self.peek(k)
        self.cursor += k
        return idx

    @property
    def epoch(self) -> int:
        return self.cursor // self.n

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "n": self.n, "seed": self.seed}

    def load_state_dict(self, st: dict) -> None:
        if int(st.get("n", self.n)) != self.n:
            raise ConfigError(f"the checkpoint's data cursor is over {st.get('n')} problems but the data has {self.n} "
                              "(data settings changed since the checkpoint)")
        self.cursor = int(st["cursor"])


# --------------------------------------------------------------------------------------------
# Rollouts, rewards, groups
# --------------------------------------------------------------------------------------------


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


def request_seed(base: int, step: int, rnd: int, slot: int, sample: int) -> int:
    """A sampling seed per response, stable across runs and resumes (independent of the server)."""
    h = hashlib.sha256(f"{base}:{step}:{rnd}:{slot}:{sample}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def build_requests(prompts: Sequence[list[int]], G: int, step: int, rnd: int, seed: int,
                   decoding: DecodingConfig, stop_token_ids: Sequence[int]) -> list[dict]:
    """G requests per prompt with ids ``s{step}-r{round}-p{slot}-g{j}`` (results are matched by id)."""
    reqs = []
    for slot, ids in enumerate(prompts):
        for j in range(G):
            reqs.append({
                "request_id": f"s{step}-r{rnd}-p{slot}-g{j}",
                "input_ids": list(ids),
                "max_new_tokens": decoding.max_new_tokens,
                "temperature": decoding.temperature,
                "top_k": decoding.top_k,
                "top_p": decoding.top_p,
                "do_sample": True,
                "stop_token_ids": list(stop_token_ids),
                "seed": request_seed(seed, step, rnd, slot, j),
            })
    return reqs


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


class Dist:
    """The few collective operations the RL step needs (no-ops in one process)."""

    def __init__(self, accelerator=None):
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        from dirl.train.common import all_reduce_sum

        return [float(v) for v in all_reduce_sum(self.acc, torch.tensor(list(values), dtype=torch.float64))]

    def max(self, value: float) -> float:
        from dirl.train.common import all_reduce_max

        return all_reduce_max(self.acc, value) if self.world > 1 else float(value)

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()


def score_responses(trajs: Sequence[dict], answers: Sequence[str], cfg: RewardConfig, max_length: int,
                    block_size: int) -> tuple[list[float], list[bool]]:
    from dirl.rewards.shaping import score_trajectories

    b = score_trajectories(trajs, answers, cfg, max_length=max_length, block_size=block_size)
    return [float(x) for x in b.rewards], [bool(x) for x in b.correct]


def rollout_and_score(client, problems: Sequence[dict], prompts: Sequence[list[int]], G: int, step: int, rnd: int,
                      cfg: RLConfig, block_size: int, stop_ids: Sequence[int], dist: Dist,
                      timers: Optional[dict] = None) -> list[Group]:
    """G rollouts per prompt and their rewards. With several ranks each generates and grades an
    interleaved share of the requests, then all ranks gather every group in the same order."""
    dec = cfg.rollout.decoding
    reqs = build_requests(prompts, G, step, rnd, cfg.train.seed, dec, stop_ids)
    mine = list(range(dist.rank, len(reqs), dist.world))
    t0 = time.time()
    local_reqs = [reqs[i] for i in mine]
    results = client.generate(local_reqs) if local_reqs else []
    check_results(local_reqs, results)
    t1 = time.time()
    answers = [problems[i // G]["answer"] for i in mine]
    rewards, correct = score_responses(results, answers, cfg.rewards, dec.max_new_tokens, block_size) \
        if results else ([], [])
    t2 = time.time()
    parts = dist.all_gather([(i, tr, rw, ok) for i, tr, rw, ok in zip(mine, results, rewards, correct)])
    if timers is not None:
        timers["rollout"] = timers.get("rollout", 0.0) + (t1 - t0)
        timers["reward"] = timers.get("reward", 0.0) + (t2 - t1)
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
    all_groups: list = field(default_factory=list)  # every rewarded group of the step, kept or not


def collect_groups(draw: Callable[[int], list[tuple[dict, list[int]]]],
                   generate: Callable[[list[dict], list[list[int]], int], list[Group]],
                   target: int, dynamic_sampling: bool, max_rounds: int, oversample: float = 1.0,
                   keep: Optional[Callable[[Group], bool]] = None) -> tuple[list[Group], CollectStats]:
    """Groups for one step. Without dynamic sampling: one round of ``target`` prompts, all kept.
    With it: rounds of ``ceil(missing * oversample)`` prompts, a group kept iff ``keep(group)``
    (default 0 < mean(correct) < 1), until ``target`` are kept or ``max_rounds`` rounds were drawn.
    Extra kept groups beyond ``target`` are dropped (their prompts were consumed all the same)."""
    from dirl.train.dipo import keep_group

    keep = keep or (lambda g: keep_group(g.correct))
    stats = CollectStats()
    kept: list[Group] = []
    for rnd in range(max_rounds if dynamic_sampling else 1):
        missing = target - len(kept)
        n = math.ceil(missing * oversample) if dynamic_sampling else target
        drawn = draw(n)
        stats.drawn += n
        stats.rounds += 1
        if not drawn:
            continue
        groups = generate([d[0] for d in drawn], [d[1] for d in drawn], rnd)
        stats.all_groups += groups
        kept += [g for g in groups if not dynamic_sampling or keep(g)]
        if len(kept) >= target:
            break
    return kept[:target], stats


# --------------------------------------------------------------------------------------------
# Samples, micro-batches
# --------------------------------------------------------------------------------------------


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
    from dirl.train.dipo import group_advantages

    out = []
    for gi, g in enumerate(groups):
        adv = group_advantages(g.rewards, len(g.rewards), scale_by_std=scale_by_std).tolist()
        for t, a in zip(g.trajectories, adv):
            out.append(Sample(t, float(a), gi, scored_count(t, score_after_eos)))
    return out


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges covering ``range(n)``, sizes differing by at most 1."""
    base, extra = divmod(n, parts)
    out, s = [], 0
    for i in range(parts):
        e = s + base + (1 if i < extra else 0)
        out.append((s, e))
        s = e
    return out


def micro_batches_per_rank(capacity: int, mini_batches: int, world: int, micro_batch_size: int) -> int:
    """Micro-batches per optimizer step on each rank for a step of at most ``capacity`` responses."""
    per_mini = math.ceil(capacity / mini_batches)
    per_rank = math.ceil(per_mini / world)
    return max(1, math.ceil(per_rank / micro_batch_size))


def plan_micro_batches(n_samples: int, mini_batches: int, rank: int, world: int, n_micro: int) -> list[list[list[int]]]:
    """For each mini-batch, this rank's micro-batches (lists of sample indices; some may be empty).
    Mini-batches are contiguous, each split evenly over ranks, each rank's share over ``n_micro``."""
    plan = []
    for a, b in split_even(n_samples, mini_batches):
        ra, rb = split_even(b - a, world)[rank]
        share = list(range(a + ra, a + rb))
        plan.append([share[s:e] for s, e in split_even(len(share), n_micro)])
    return plan


def _dummy_batch(block_size: int):
    """A one-token batch with one scored position: keeps every rank's micro-batch count equal when a
    rank has nothing left (its loss is multiplied by 0)."""
    from dirl.train.layouts import build_batch

    t = {"prompt_ids": [], "token_ids": [0], "step_map": [1], "response_length": 1}
    return build_batch([t], block_size, 0)


def _per_token(batch, values: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Gather per-sample per-token values (``values[i][k]``) in the batch's scored order."""
    return torch.stack([values[int(i)][int(k)] for i, k in zip(batch.traj, batch.tok)]) if batch.num_scored \
        else torch.zeros(0)


# --------------------------------------------------------------------------------------------
# Log-prob passes and the update
# --------------------------------------------------------------------------------------------


@dataclass
class BatchSettings:
    block_size: int
    mask_id: int
    pad_id: int
    layout: str
    score_after_eos: bool
    temperature: float
    chunk_size: int
    device: Any
    row_tokens: int = 0


def make_batch(samples: Sequence[Sample], s: BatchSettings):
    from dirl.train.layouts import build_batch

    if not samples:
        return _dummy_batch(s.block_size)
    return build_batch([x.traj for x in samples], s.block_size, s.mask_id, s.layout, s.score_after_eos,
                       row_tokens=s.row_tokens, pad_id=s.pad_id)


@torch.no_grad()
def prepass(scorer, ref_model, samples: list[Sample], plan: list[list[list[int]]], s: BatchSettings,
            want_old: bool, want_ref: bool, entropy: bool) -> dict:
    """No-grad log-prob pass over this rank's samples before any update of the step: stores
    ``sample.old`` (policy) and ``sample.ref`` (reference model). Returns sums for the mismatch and
    entropy metrics (over every token it scored)."""
    from dirl.train.layouts import score_batch

    acc = {"mis_sum": 0.0, "mis_max": 0.0, "mis_n": 0, "ent_sum": 0.0, "ent_n": 0, "tokens": 0}
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
                if ent is not None:
                    acc["ent_sum"] += float(ent.sum())
                    acc["ent_n"] += int(ent.numel())
            if want_ref:
                lr, _ = score_batch(ref_model, dev, s.temperature, s.chunk_size)
                _scatter(sub, batch, lr.float().cpu(), "ref")
            acc["tokens"] += batch.num_tokens
    return acc


def _scatter(sub: list[Sample], batch, lp: torch.Tensor, attr: str) -> None:
    for x in sub:
        setattr(x, attr, torch.full((len(x.traj["token_ids"]),), float("nan")))
    for i, k, v in zip(batch.traj.tolist(), batch.tok.tolist(), lp.tolist()):
        getattr(sub[i], attr)[k] = v


def _mismatch(acc: dict, sub: list[Sample], batch, lp: torch.Tensor) -> None:
    rec = []
    ok = []
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


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def update(wrapped, stepper, samples: list[Sample], mini_plan: list[list[int]], s: BatchSettings, cfg: RLConfig,
           dist: Dist, behaviour: str, measure: Optional[dict] = None) -> dict:
    """Forward/backward of one mini-batch's micro-batches on this rank and one optimizer step.

    Normalisers count the whole mini-batch on every rank: responses with at least one scored token
    (``grpo``) or scored tokens (``dapo``). ``behaviour``: ``current`` (ratio 1: detached current
    log-probs), ``old`` (``sample.old`` from the pre-pass) or ``rollout`` (recorded log-probs).
    ``measure`` (when given) collects mismatch and entropy sums from these forwards.
    """
    from dirl.train.dipo import LossStats, dipo_token_loss, token_weights

    lo = cfg.loss
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
            t0 = time.time()
            lp, ent = wrapped(batch.to(s.device), temperature=s.temperature, chunk_size=s.chunk_size,
                              with_entropy=measure is not None and cfg.train.entropy and bool(sub))
            lp = lp.float()
            _sync(s.device)
            fwd_time += time.time() - t0
            if not sub or batch.num_scored == 0 or tot_resp == 0:
                loss = lp.sum() * 0.0
                stepper.backward(loss)
                continue
            if behaviour == "current":
                old = lp.detach()
            elif behaviour == "old":
                old = _per_token(batch, [x.old for x in sub]).to(lp.device)
            else:
                old = _per_token(batch, [torch.tensor(x.traj["logprobs"], dtype=torch.float32) for x in sub]).to(lp.device)
            adv = torch.tensor([x.advantage for x in sub], dtype=torch.float32)[batch.traj].to(lp.device)
            ref = _per_token(batch, [x.ref for x in sub]).to(lp.device) if lo.kl_beta > 0 else None
            tl, st = dipo_token_loss(lp, old, adv, lo.clip_eps_low, lo.clip_eps_high, lo.kl_beta, ref)
            counts = torch.bincount(batch.traj, minlength=len(sub))
            w = token_weights(batch.traj, counts, lo.aggregation, tot_resp, max(tot_tok, 1.0)).to(lp.device)
            loss = (tl * w).sum()
            stepper.backward(loss)
        loss_sum += float(loss.detach())
        stats = stats.add(st)
        if measure is not None:
            _mismatch(measure, sub, batch, lp.detach().cpu())
            if ent is not None:
                measure["ent_sum"] += float(ent.sum())
                measure["ent_n"] += int(ent.numel())
    out = stepper.step()
    sums = dist.sum([loss_sum, stats.clipped, stats.tokens, stats.kl, stats.ratio, fwd_tokens])
    out.update({
        "loss": sums[0], "clip_fraction": sums[1] / max(sums[2], 1.0), "kl": sums[3] / max(sums[2], 1.0),
        "ratio_mean": sums[4] / max(sums[2], 1.0), "ratio_max": dist.max(stats.ratio_max),
        "scored_tokens": sums[2], "forward_tokens": sums[5], "responses": tot_resp, "forward_s": fwd_time,
    })
    return out


# --------------------------------------------------------------------------------------------
# Servers and weights
# --------------------------------------------------------------------------------------------


def start_servers(cfg: RLConfig, model_dir: Path, dist: Dist, device, run_dir: Path):
    """Colocated servers (one per rank, on the rank's device) unless ``rollout.urls`` names a pool.
    Returns (client, handles, mode); checks every server's block size and mask id against the model."""
    from dirl.eval.run import server_threads
    from dirl.rollout.client import RolloutClient
    from dirl.rollout.server import start_server

    r = cfg.rollout
    handles = []
    if r.urls:
        urls, mode = list(r.urls), "pool"
    else:
        dev = r.device if r.device != "auto" else str(device)
        log = run_dir / "logs" / f"server-rank{dist.rank}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        h = start_server(model_dir, backend=r.backend, host=r.host, decoding=r.decoding, api_key=r.api_key or None,
                         device=dev, dtype=r.dtype, max_batch_size=r.max_batch_size,
                         threads=server_threads(r.threads, dev), startup_timeout=r.startup_timeout_s, log_path=log)
        handles.append(h)
        urls, mode = [h.url], "colocated"
    client = RolloutClient(urls, api_key=r.api_key or None, max_concurrency=r.max_concurrency, retries=r.retries,
                           timeout=r.timeout_s, batch_size=r.request_batch_size)
    return client, handles, mode


def check_servers(client, block_size: int, mask_id: int) -> list[dict]:
    infos = client.info()
    for url, info in zip(client.urls, infos):
        if int(info.get("block_size", block_size)) != block_size:
            raise ConfigError(f"config key 'rollout.decoding.block_size': server {url} decodes with block size "
                              f"{info.get('block_size')} but the trained model's is {block_size}")
        if info.get("mask_token_id") is not None and int(info["mask_token_id"]) != mask_id:
            raise ConfigError(f"config key 'model.mask_token_id': server {url} uses mask id {info['mask_token_id']} "
                              f"but the trained model's is {mask_id}")
    return infos


def push_weights(client, model, mode: str, dist: Dist, transport: str = "auto") -> float:
    """Send the current weights to the servers in place. Colocated: every rank to its own server;
    pool: rank 0 to every server. Returns the seconds it took (on this rank)."""
    t0 = time.time()
    if mode == "colocated" or dist.rank == 0:
        client.push_weights(model, transport=transport)
    dist.barrier()
    return time.time() - t0


# --------------------------------------------------------------------------------------------
# Evaluation during training
# --------------------------------------------------------------------------------------------


def evaluate(client, tok, cfg: RLConfig, block_size: int, stop_ids: Sequence[int], dist: Dist) -> dict:
    """Held-out accuracy and reward (``eval.samples`` per problem, the training decoding settings)."""
    from dirl.data.benchmarks import load_benchmark
    from dirl.data.chat import prompt_ids

    e = cfg.eval
    probs = load_benchmark(e.benchmark, synthetic_size=e.problems, limit=e.problems)
    problems = [{"id": p["id"], "answer": p["answer"]} for p in probs]
    prompts = [prompt_ids(tok, p["prompt"]) for p in probs]
    ev_cfg = _with_seed(cfg, e.seed)
    groups = rollout_and_score(client, problems, prompts, e.samples, step=-1, rnd=0, cfg=ev_cfg,
                               block_size=block_size, stop_ids=stop_ids, dist=dist)
    corr = [c for g in groups for c in g.correct]
    rew = [r for g in groups for r in g.rewards]
    lens = [t["response_length"] for g in groups for t in g.trajectories]
    return {"eval/accuracy": sum(corr) / len(corr), "eval/reward": sum(rew) / len(rew),
            "eval/response_length": sum(lens) / len(lens), "eval/problems": len(groups)}


def _with_seed(cfg: RLConfig, seed: int) -> RLConfig:
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def newest_sft_checkpoint(runs_dir: str | os.PathLike) -> Optional[Path]:
    """The model folder of the newest complete checkpoint of an embedded-default SFT run
    (``runs_dir/sft-*``), or None."""
    from dirl.train.checkpoint import list_checkpoints

    root = Path(runs_dir)
    if not root.is_dir():
        return None
    best: tuple[float, Optional[Path]] = (-1.0, None)
    for run in root.glob("sft*"):
        for _, ck in list_checkpoints(run):
            m = ck / "model"
            try:
                raw = json.loads((m / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if int(raw.get("vocab_size", 1 << 30)) > 4096:  # the embedded default's tiny vocabulary only
                continue
            t = (ck / "COMPLETE").stat().st_mtime
            if t > best[0]:
                best = (t, m)
    return best[1]


def resolve_initial_model(cfg: RLConfig, run_dir: Path, is_main: bool, dist: Dist) -> Path:
    """The checkpoint folder the run starts from (servers load it; the trainer too)."""
    from dirl.eval.run import resolve_model_dir

    if cfg.model.path:
        return resolve_model_dir(cfg.model.path)
    found = newest_sft_checkpoint(cfg.runs_dir)
    if found is not None:
        return found
    out = run_dir / "initial_model"
    if is_main and not (out / "config.json").is_file():
        from dirl.model.tiny import make_tiny_model

        make_tiny_model(out, cfg.model.tiny)
    dist.barrier()
    return out


def load_policy(path: Path, cfg: RLConfig, device, dtype: str):
    from dirl.model.sdar import load_model, load_tokenizer

    mc = cfg.model
    model = load_model(path, device=device, dtype=dtype, attn_backend=mc.attn_backend, block_size=mc.block_size,
                       mask_token_id=mc.mask_token_id)
    return model, load_tokenizer(path)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _resume_point(cfg: RLConfig, run_dir: Path) -> Optional[Path]:
    from dirl.train.checkpoint import latest_checkpoint, resolve_checkpoint

    r = cfg.train.resume
    if r in ("never", ""):
        return None
    if r == "auto":
        return latest_checkpoint(run_dir)
    return resolve_checkpoint(r)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def step_metrics(stats: CollectStats, kept: Sequence[Group], target: int) -> dict:
    """Rollout metrics of one step, over every rewarded group (before filtering)."""
    from dirl.rewards.shaping import tokens_per_step

    gs = stats.all_groups
    trajs = [t for g in gs for t in g.trajectories]
    rew = [r for g in gs for r in g.rewards]
    cor = [float(c) for g in gs for c in g.correct]
    lens = [int(t["response_length"]) for t in trajs]
    tps = [v for v in (tokens_per_step(t.get("step_map"), t.get("response_length")) for t in trajs) if v]
    m = {
        "reward/mean": _mean(rew),
        "reward/std": float(torch.tensor(rew).std(unbiased=False)) if rew else float("nan"),
        "accuracy": _mean(cor),
        "groups/kept": len(kept),
        "groups/target": target,
        "groups/rewarded": len(gs),
        "groups/all_correct": sum(1 for g in gs if g.accuracy == 1.0),
        "groups/all_wrong": sum(1 for g in gs if g.accuracy == 0.0),
        "sampling/rounds": stats.rounds,
        "sampling/prompts_drawn": stats.drawn,
        "sampling/skipped_long_prompts": stats.skipped_long,
        "response_length/mean": _mean(lens),
        "response_length/max": max(lens) if lens else 0,
        "response_length/truncated": _mean([float(t.get("finish_reason") == "length") for t in trajs]),
        "decode/tokens_per_step": _mean(tps),
        "tokens/generated": sum(len(t["token_ids"]) for t in trajs),
    }
    if kept:
        m["reward/kept_mean"] = _mean([r for g in kept for r in g.rewards])
    return m


def train_rl(cfg: RLConfig) -> dict:
    """Run RL as configured; returns the run summary (also ``RUN_DIR/summary.json``)."""
    from dirl.data.chat import prompt_ids as chat_prompt_ids
    from dirl.data.chat import stop_token_ids
    from dirl.model.tiny import count_parameters
    from dirl.train import checkpoint as ckpt_mod
    from dirl.train.common import (
        GradientStepper,
        MetricsLogger,
        build_optimizer,
        build_scheduler,
        make_run_dir,
        plot_curves,
        progress_bar,
        rank_zero_print,
        resolve_mixed_precision,
        resolve_strategy,
        seed_everything,
        setup_accelerator,
        unwrap,
    )
    from dirl.train.layouts import TrajectoryScorer

    t, lo = cfg.train, cfg.loss
    register_custom_rewards(cfg.custom_rewards)
    capacity = t.prompts_per_step * t.samples_per_prompt

    def n_micro_of(world: int) -> int:
        return micro_batches_per_rank(capacity, t.mini_batches, world, t.micro_batch_size)

    acc = setup_accelerator(cfg.dist, micro_batch_size=t.micro_batch_size, gradient_accumulation_steps=n_micro_of,
                            max_grad_norm=cfg.optim.max_grad_norm)
    dist = Dist(acc)
    n_micro = n_micro_of(dist.world)
    strategy = resolve_strategy(cfg.dist, dist.world)
    seed_everything(t.seed + dist.rank)
    run_dir = make_run_dir(acc, cfg.output_dir, cfg.run_name, "rl", cfg)
    resume_from = _resume_point(cfg, run_dir)
    init_dir = resolve_initial_model(cfg, run_dir, acc.is_main_process, dist)
    server_model_dir = (resume_from / "model") if resume_from is not None else init_dir

    ds_bf16 = strategy == "deepspeed" and resolve_mixed_precision(cfg.dist) == "bf16"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if ds_bf16 else "float32")
    model, tok = load_policy(server_model_dir, cfg, acc.device, dtype)
    if cfg.model.gradient_checkpointing:
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.hf.config.use_cache = False
    model.train()
    ref_model = None
    if lo.kl_beta > 0:  # the frozen reference is the starting policy, not the resumed one
        ref_model, _ = load_policy(init_dir, cfg, acc.device, dtype)
        ref_model.eval().requires_grad_(False)
    B, mask_id = model.block_size, model.mask_token_id
    stop_ids = stop_token_ids(tok)

    problems = load_problems(cfg.data)
    sampler = PromptSampler(len(problems), seed=cfg.data.seed)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps * t.mini_batches * t.num_iterations)
    wrapped, optimizer = acc.prepare(TrajectoryScorer(model), optimizer)
    stepper = GradientStepper(acc, wrapped, optimizer, scheduler, cfg.optim.max_grad_norm, n_micro)

    start_step = 0
    if resume_from is not None:
        state = ckpt_mod.load_checkpoint(resume_from, optimizer=optimizer, scheduler=scheduler, accelerator=acc)
        start_step = int(state["step"])
        sampler.load_state_dict(state["extra"]["sampler"])
        rank_zero_print(acc, f"[dirl rl] resumed from {resume_from} at step {start_step} "
                             f"(prompt cursor {sampler.cursor})")

    client, handles, mode = start_servers(cfg, server_model_dir, dist, acc.device, run_dir)
    try:
        infos = check_servers(client, B, mask_id)
        if mode == "pool" and resume_from is not None:  # a pool keeps the weights it had: send ours
            push_weights(client, unwrap(wrapped).model, mode, dist, cfg.rollout.weight_transport)
    except BaseException:
        for h in handles:
            h.stop()
        raise
    rank_zero_print(acc, f"[dirl rl] run {run_dir} | {count_parameters(model):,} params from {server_model_dir} | "
                         f"{strategy}, {dist.world} process(es), {n_micro} micro-batch(es) of <= {t.micro_batch_size} "
                         f"responses per rank per optimizer step | {t.steps} steps x {t.prompts_per_step} prompts x "
                         f"{t.samples_per_prompt} samples | servers ({mode}): {', '.join(client.urls)} "
                         f"[{infos[0].get('engine')}, {infos[0].get('unmasking_strategy')}]")

    settings = BatchSettings(B, mask_id, int(tok.pad_token_id or 0), lo.layout, lo.score_after_eos,
                             float(cfg.rollout.decoding.temperature), lo.logits_chunk_size, acc.device,
                             t.row_tokens)
    on_policy = t.num_iterations == 1 and t.mini_batches == 1
    behaviour = "rollout" if lo.behaviour_logprobs == "rollout" else ("current" if on_policy else "old")

    logger = MetricsLogger(run_dir, cfg.logging, is_main=acc.is_main_process,
                           resume_step=start_step if resume_from is not None else None,
                           run_name=run_dir.name, config=cfg)
    samples_path = run_dir / "samples.jsonl"
    if acc.is_main_process:
        if resume_from is not None:
            from dirl.data.formats import truncate_jsonl_log

            truncate_jsonl_log(samples_path, start_step)  # a torn last line (killed, disk full) is dropped
        elif samples_path.exists():
            samples_path.unlink()
    bar = progress_bar(t.steps, initial=start_step, desc="rl", enabled=cfg.logging.progress_bar,
                       is_main=acc.is_main_process)
    history: list[dict] = []
    evals: list[dict] = []
    final_ckpt: Optional[Path] = resume_from
    last_saved = start_step if resume_from is not None else -1

    def draw(n: int) -> list[tuple[dict, list[int]]]:
        out = []
        for i in sampler.draw(n):
            p = problems[i]
            ids = chat_prompt_ids(tok, p["messages"])
            if cfg.data.max_prompt_tokens and len(ids) > cfg.data.max_prompt_tokens:
                collect_stats_holder[0] += 1
                continue
            out.append((p, ids))
        return out

    collect_stats_holder = [0]

    def run_eval(step: int) -> None:
        te = time.time()
        m = evaluate(client, tok, cfg, B, stop_ids, dist)
        m["time/eval"] = time.time() - te
        evals.append({"step": step, **m})
        logger.log(step, m)
        rank_zero_print(acc, f"[dirl rl] step {step}: held-out accuracy {m['eval/accuracy']:.3f} "
                             f"({m['eval/problems']} problems x {cfg.eval.samples})")

    def save(step: int) -> Path:
        extra = {"sampler": sampler.state_dict(), "config_steps": t.steps}
        return ckpt_mod.save_checkpoint(run_dir, step, unwrap(wrapped).model, tok, optimizer, scheduler, extra,
                                        accelerator=acc, keep_last=t.keep_last)

    train_start = time.time()
    try:
        if cfg.eval.enabled and start_step == 0:
            run_eval(0)
        for step in range(start_step, t.steps):
            ts = time.time()
            timers: dict[str, float] = {}
            collect_stats_holder[0] = 0

            def generate(probs, prompts, rnd, _step=step):
                return rollout_and_score(client, probs, prompts, t.samples_per_prompt, _step, rnd, cfg, B, stop_ids,
                                         dist, timers)

            kept, cstats = collect_groups(draw, generate, t.prompts_per_step, t.dynamic_sampling,
                                          t.max_sampling_rounds, t.oversample)
            cstats.skipped_long = collect_stats_holder[0]
            metrics = step_metrics(cstats, kept, t.prompts_per_step)
            samples = make_samples(kept, lo.scale_adv_by_std, lo.score_after_eos)
            if t.shuffle_samples and t.mini_batches > 1:
                random.Random(t.seed * 7919 + step).shuffle(samples)
            plan = plan_micro_batches(len(samples), t.mini_batches, dist.rank, dist.world, n_micro)

            tl = time.time()
            want_old = behaviour == "old"
            measure = {"mis_sum": 0.0, "mis_max": 0.0, "mis_n": 0, "ent_sum": 0.0, "ent_n": 0}
            if samples and (want_old or ref_model is not None):
                pre = prepass(unwrap(wrapped), ref_model, samples, plan, settings, want_old, ref_model is not None,
                              t.entropy and want_old)
                if want_old:
                    measure = pre
            timers["logprobs"] = time.time() - tl

            tu = time.time()
            ups = []
            if samples:
                for it in range(t.num_iterations):
                    for mi, mini in enumerate(plan):
                        first = it == 0 and mi == 0 and not want_old
                        ups.append(update(wrapped, stepper, samples, mini, settings, cfg, dist, behaviour,
                                          measure if first else None))
            # the forwards of the update are the step's log-prob pass (on-policy: the only one)
            fwd = sum(u["forward_s"] for u in ups)
            timers["logprobs"] += fwd
            timers["update"] = time.time() - tu - fwd
            timers["weight_push"] = push_weights(client, unwrap(wrapped).model, mode, dist,
                                                 cfg.rollout.weight_transport) if ups else 0.0

            ms = dist.sum([measure["mis_sum"], measure["mis_n"], measure["ent_sum"], measure["ent_n"]])
            metrics.update({
                "mismatch/mean": ms[0] / ms[1] if ms[1] else float("nan"),
                "mismatch/max": dist.max(measure["mis_max"]),
                "entropy": ms[2] / ms[3] if ms[3] else float("nan"),
                "updates": len(ups),
            })
            if ups:
                metrics.update({
                    "loss": _mean([u["loss"] for u in ups]),
                    "clip_fraction": _mean([u["clip_fraction"] for u in ups]),
                    "kl": _mean([u["kl"] for u in ups]),
                    "ratio/mean": _mean([u["ratio_mean"] for u in ups]),
                    "ratio/max": max(u["ratio_max"] for u in ups),
                    "grad_norm": _mean([u["grad_norm"] for u in ups]),
                    "lr": ups[-1]["lr"],
                    "tokens/scored": sum(u["scored_tokens"] for u in ups) / t.num_iterations,
                    "tokens/forward": sum(u["forward_tokens"] for u in ups) / t.num_iterations,
                })
            step_time = time.time() - ts
            for k in ("rollout", "reward", "logprobs", "update", "weight_push"):
                metrics[f"time/{k}"] = dist.max(timers.get(k, 0.0))
            metrics["time/step"] = step_time
            done = step + 1
            history.append({"step": done, **metrics})
            if done % cfg.logging.log_every == 0 or done == t.steps:
                logger.log(done, metrics)
            if cfg.log_samples and acc.is_main_process:
                kept_ids = {id(g) for g in kept}
                with samples_path.open("a") as f:
                    for g in cstats.all_groups:
                        f.write(json.dumps({"step": done, "round": g.round, "problem_id": g.problem["id"],
                                            "answer": g.problem["answer"], "kept": id(g) in kept_ids,
                                            "rewards": g.rewards, "correct": g.correct,
                                            "first_response": g.trajectories[0].get("text", "")}) + "\n")
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                            kept=f"{len(kept)}/{t.prompts_per_step}", len=f"{metrics['response_length/mean']:.0f}",
                            refresh=False)
            bar.update(1)
            if cfg.eval.enabled and cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
                run_eval(done)
            if t.save_every and done % t.save_every == 0 and done != t.steps:
                final_ckpt = save(done)
                last_saved = done
        if cfg.eval.enabled and t.steps > start_step:
            run_eval(t.steps)
        if last_saved != t.steps:
            final_ckpt = save(t.steps)
    finally:
        bar.close()
        logger.close()
        for h in handles:
            h.stop()
    train_time = time.time() - train_start

    plot = None
    if acc.is_main_process:
        plot = plot_curves(run_dir / "metrics.jsonl", ["reward/mean", "accuracy", "response_length/mean",
                                                       "eval/accuracy"],
                           run_dir / "curves.png", title=f"RL {run_dir.name}", smooth=5)
    k = min(5, len(history))
    summary = {
        "run_dir": str(run_dir),
        "initial_model": str(init_dir),
        "final_checkpoint": str(final_ckpt) if final_ckpt else None,
        "final_model": str(final_ckpt / "model") if final_ckpt else None,
        "steps": t.steps,
        "start_step": start_step,
        "reward_first": _mean([h["reward/mean"] for h in history[:k]]) if history else None,
        "reward_last": _mean([h["reward/mean"] for h in history[-k:]]) if history else None,
        "accuracy_first": _mean([h["accuracy"] for h in history[:k]]) if history else None,
        "accuracy_last": _mean([h["accuracy"] for h in history[-k:]]) if history else None,
        "eval": evals,
        "train_time_s": round(train_time, 2),
        "world_size": dist.world,
        "strategy": strategy,
        "servers": mode,
        "plot": str(plot) if plot else None,
    }
    if acc.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if history:
            line = (f"[dirl rl] reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, "
                    f"accuracy {summary['accuracy_first']:.3f} -> {summary['accuracy_last']:.3f} "
                    f"(mean of the first / last {k} steps)")
            if len(evals) >= 2:
                line += f"; held-out accuracy {evals[0]['eval/accuracy']:.3f} -> {evals[-1]['eval/accuracy']:.3f}"
            print(line + f" in {train_time:.0f}s; curves: {plot}", flush=True)
        print(f"[dirl rl] final checkpoint: {summary['final_model']}", flush=True)
    acc.wait_for_everyone()
    return summary


def cli_main(argv: list[str]) -> int:
    from dirl.cli import run_config_command

    path, overrides = run_config_command(
        argv, "dirl rl",
        "RL for block diffusion LMs (DiPO/GRPO, DAPO). Without a config: the embedded default (newest "
        "quick-start SFT checkpoint or a tiny model, synthetic arithmetic, CPU, a few minutes).")
    cfg = load_rl_config(path, overrides)
    train_rl(cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
