"""The ``dirl rl`` configuration: typed sections, their checks, and the names users bring along.

Where a key means exactly what TRL's ``GRPOConfig`` or verl's trainer key means, it carries that
name (``num_generations``, ``epsilon`` / ``epsilon_high``, ``beta``, ``loss_type``,
``num_iterations``); where dirl's meaning differs, a name that cannot be confused (``num_mini_batches``
is a *count*, verl's ``ppo_mini_batch_size`` a size). docs/CONFIG.md has the full translation
table. An old key name is a one-line :class:`~dirl.config.ConfigError` naming the new one.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

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
    check_optim,
    check_logging,
    check_path_exists,
    check_positive,
    check_seed,
    check_synthetic_split,
    check_tiny,
    check_training_model,
    load_config,
)
from dirl.data.benchmarks import canonical_name
from dirl.rewards.shaping import BUILTIN_REWARDS, RewardConfig, register_reward
from dirl.rollout.launch import ServerConfig, check_server_config
from dirl.train.common import DistConfig

# The server keys that lived under `rollout` before the RL and eval configs shared one `server` section.
_MOVED_TO_SERVER = ("urls", "backend", "host", "api_key", "device", "dtype", "max_batch_size", "threads",
                    "max_concurrency", "request_batch_size", "retries", "timeout_s", "startup_timeout_s")


@dataclass
class RLDataConfig:
    RENAMED: ClassVar[dict[str, str]] = {"num_samples": "data.limit"}

    # "synthetic" (built-in arithmetic), a .json / .jsonl / .parquet file, or a `datasets` name
    # (local folder or Hub id, e.g. Auraithm/BigMath-RL)
    source: str = "synthetic"
    split: str = "train"  # the split of a `datasets` source (synthetic: train)
    subset: str = ""  # `datasets` configuration name
    question_key: str = ""  # "": the first of question, problem, prompt
    answer_key: str = ""  # "": the first of ground_truth_answer, answer, final_answer, solution
    # The user turn; {question} is replaced. The chat template is applied afterwards.
    prompt_template: str = "{question}"
    system_prompt: str = ""  # a system turn before the user turn (empty: none)
    limit: Optional[int] = None  # problems used (the first ones; synthetic: distinct train problems); None: all
    digits: int = 2  # synthetic only
    max_prompt_tokens: int = 0  # 0: no limit; longer prompts are skipped (counted) when drawn
    seed: int = 0  # order of the prompts (a fresh permutation every epoch)


@dataclass
class RolloutConfig:
    """How responses are sampled and how new weights reach the servers (the servers: ``server``)."""

    RENAMED: ClassVar[dict[str, str]] = {k: f"server.{k}" for k in _MOVED_TO_SERVER}

    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=40))
    # how pushed weights travel: ipc (CUDA handles; trainer and servers on this machine's GPUs), file
    # (safetensors in the servers' --weights-dir), inline (in the request body); auto: the first that fits
    weight_transport: Literal["auto", "file", "inline", "ipc"] = "auto"
    # The memory hand-off (SPEC section 8): servers asleep from the end of the rollout until the
    # weight push, so the log-prob pass and the updates have the device. None: servers started for
    # the run (colocated: they share the trainer's GPUs) sleep, a pool given by URL does not.
    sleep_while_training: Optional[bool] = None
    sleep_level: int = 1  # 1: KV cache freed; 2: weights too (DiRL's runs)


@dataclass
class LossConfig:
    """The DiPO / GRPO loss (``dirl.train.dipo``)."""

    RENAMED: ClassVar[dict[str, str]] = {"aggregation": "loss.loss_type", "clip_eps_low": "loss.epsilon",
                                         "clip_eps_high": "loss.epsilon_high", "kl_beta": "loss.beta"}

    # grpo: per-response token mean, then the mean over responses; dapo: the mean over every scored
    # token of the mini-batch (TRL's loss_type values of the same meaning)
    loss_type: Literal["grpo", "dapo"] = "grpo"
    epsilon: float = 0.2  # lower clip of the ratio: 1 - epsilon
    epsilon_high: float = 0.28  # upper clip: 1 + epsilon_high
    beta: float = 0.0  # KL coefficient (k3 estimator); > 0 loads a frozen reference model
    scale_adv_by_std: bool = True  # divide group advantages by the group's std
    # |l - l_old| and the k3 exponent clamped to this before exp() (DiRL's bound): a far-off
    # behaviour policy gives finite losses and gradients; null turns the clamp off
    log_ratio_clamp: Optional[float] = 10.0
    # Behaviour policy of the ratio when it is not the current policy: "recompute" (the trainer's
    # log-probs before the step's first update), "rollout" (the engine's recorded log-probs), or
    # "auto": recompute in the synchronous loop, rollout with train.staleness 1 (the rollouts were
    # made with the previous weights, which only the engine's numbers describe).
    behaviour_logprobs: Literal["auto", "recompute", "rollout"] = "auto"
    score_after_eos: bool = False  # also train the tokens after the first stop token
    # how the log-prob pass lays out the denoising states (dirl/train/layouts.py; same numbers):
    # packed, one noisy copy per (block, step) after the clean text; rounds, DiRL's [x_t ; x_0] per step
    layout: Literal["packed", "rounds"] = "packed"
    logits_chunk_size: int = 4096  # scored positions per lm_head chunk (memory of the logits)


@dataclass
class RLTrainConfig:
    RENAMED: ClassVar[dict[str, str]] = {"samples_per_prompt": "train.num_generations",
                                         "mini_batches": "train.num_mini_batches",
                                         "dynamic_sampling": "train.filter_groups"}

    steps: int = 100  # RL steps (one rollout batch each)
    prompts_per_step: int = 8  # groups trained on per step
    num_generations: int = 8  # G: responses sampled per prompt
    num_mini_batches: int = 1  # optimizer steps per rollout batch and iteration (a count, not a size)
    num_iterations: int = 1  # passes over each rollout batch
    micro_batch_size: int = 64  # responses per forward on one rank
    # Tokens per packed row: the responses of a micro-batch sit side by side as separate documents
    # in rows of about this many tokens (a longer response gets a row of its own). 0: one row per
    # micro-batch (best with FlexAttention on GPU; on CPU the dense mask grows with the row squared).
    row_tokens: int = 512
    # Drop groups whose responses are all correct or all wrong (zero advantage) and refill the step
    # with more prompts until exactly prompts_per_step groups are kept, as DiRL's GRPO and DAPO runs
    # do (verl: algorithm.filter_groups). false: one round, every group kept.
    filter_groups: bool = True
    max_sampling_rounds: int = 8  # bound on refill rounds; a step still short after it fails loudly
    oversample: float = 1.0  # prompts drawn per round = ceil(missing groups * oversample)
    shuffle_samples: bool = True  # shuffle responses across mini-batches (when there are several)
    seed: int = 0  # sampling seeds of the rollouts and the mini-batch shuffle
    save_every: int = 20  # 0: only the final checkpoint
    keep_last: int = 2  # complete checkpoints kept (0: all)
    resume: str = "auto"  # "auto": newest checkpoint of the run folder; "never"; or a checkpoint path
    entropy: bool = True  # log the policy entropy of the scored tokens
    # The trainer's weights, gradients and optimizer state on the CPU while the servers roll out
    # (CUDA, single process or DDP; under DeepSpeed use its own offload_optimizer instead).
    offload_during_rollout: bool = False
    # Policy versions a step's rollouts may lag the trainer. 0: the synchronous loop (roll out with
    # the current weights, then train). 1: one-step off-policy: step t+1's rollout runs with the
    # weights before step t's update while the trainer computes that update; the ratio divides by
    # the engine's recorded log-probs. Needs rollout.sleep_while_training false and no
    # train.offload_during_rollout (the servers generate while the trainer trains).
    staleness: int = 0


@dataclass
class RLEvalConfig:
    """Held-out accuracy during training, through the same servers (``enabled: false`` turns it off)."""

    RENAMED: ClassVar[dict[str, str]] = {"problems": "eval.num_problems", "samples": "eval.num_samples"}

    benchmark: str = "synthetic"  # a name known to dirl.data.benchmarks (synthetic: the held-out split)
    num_problems: int = 200  # problems evaluated (the first ones of the benchmark)
    num_samples: int = 2  # responses per problem
    every: int = 0  # steps between evaluations (0: only before the first and after the last step)
    enabled: bool = True  # false: no held-out evaluation during the run
    seed: int = 1234  # sampling seed of the evaluation's responses (the same at every evaluation)


@dataclass
class RLConfig:
    # model.path empty: the newest embedded-default SFT checkpoint under runs_dir, else a fresh tiny model
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
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
    output_dir: str = "runs"  # the run folder is OUTPUT_DIR/RUN_NAME
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
        if dec.temperature <= 0 or not dec.do_sample:
            raise ConfigError("config key 'rollout.decoding.temperature': RL needs sampling (temperature > 0, "
                              "do_sample true); greedy rollouts have no sampling log-probs")
        t, lo = self.train, self.loss
        for key in ("steps", "prompts_per_step", "num_generations", "num_mini_batches", "num_iterations",
                    "micro_batch_size", "max_sampling_rounds"):
            check_positive(f"train.{key}", getattr(t, key))
        if t.num_mini_batches > t.prompts_per_step * t.num_generations:
            # an empty mini-batch would still be an optimizer step: Adam moves the weights on its momentum
            raise ConfigError(f"config key 'train.num_mini_batches': {t.num_mini_batches} is more than the "
                              f"{t.prompts_per_step * t.num_generations} responses of a step "
                              f"(train.prompts_per_step x train.num_generations)")
        check_positive("train.save_every", t.save_every, allow_zero=True)
        check_positive("train.row_tokens", t.row_tokens, allow_zero=True)
        check_positive("train.keep_last", t.keep_last, allow_zero=True)
        if t.oversample < 1.0:
            raise ConfigError(f"config key 'train.oversample': must be >= 1, got {t.oversample!r}")
        if t.num_generations < 2:
            raise ConfigError("config key 'train.num_generations': group advantages need at least 2 samples")
        if t.resume not in ("auto", "never", ""):
            check_path_exists("train.resume", t.resume)
        check_positive("loss.epsilon", lo.epsilon, allow_zero=True)
        check_positive("loss.epsilon_high", lo.epsilon_high, allow_zero=True)
        if lo.epsilon >= 1.0:
            raise ConfigError(f"config key 'loss.epsilon': must be < 1, got {lo.epsilon!r}")
        check_positive("loss.beta", lo.beta, allow_zero=True)
        if lo.log_ratio_clamp is not None:
            check_positive("loss.log_ratio_clamp", lo.log_ratio_clamp)
        check_positive("loss.logits_chunk_size", lo.logits_chunk_size)
        check_optim(self.optim)
        if not self.model.path:
            check_tiny(self.model.tiny)
        check_seed("train.seed", self.train.seed)
        check_seed("data.seed", self.data.seed)
        check_synthetic_split(self.data.source, self.data.split)
        check_positive("data.digits", self.data.digits)
        check_logging(self.logging)
        check_training_model(self.model)
        check_positive("data.max_prompt_tokens", self.data.max_prompt_tokens, allow_zero=True)
        check_positive("data.limit", self.data.limit)
        if "{question}" not in self.data.prompt_template:
            raise ConfigError("config key 'data.prompt_template': must contain {question}")
        if self.data.source != "synthetic" and self.data.source.endswith((".json", ".jsonl", ".parquet")):
            check_path_exists("data.source", self.data.source)
        check_server_config(self.server)
        if self.rollout.sleep_level not in (1, 2):
            raise ConfigError(f"config key 'rollout.sleep_level': must be 1 (KV cache) or 2 (KV cache and weights), "
                              f"got {self.rollout.sleep_level!r}")
        if t.offload_during_rollout and self.dist.strategy == "deepspeed":
            raise ConfigError("config key 'train.offload_during_rollout': not with DeepSpeed (its parameters are views "
                              "of flat buffers); use DeepSpeed's offload_optimizer, or dist.strategy ddp")
        if t.staleness not in (0, 1):
            raise ConfigError(f"config key 'train.staleness': 0 (synchronous) or 1 (one-step off-policy), "
                              f"got {t.staleness!r}")
        if t.staleness:
            if self.rollout.sleep_while_training:
                raise ConfigError("config keys 'train.staleness' and 'rollout.sleep_while_training': with staleness 1 "
                                  "the servers generate the next step while the trainer trains, so they cannot "
                                  "sleep; set rollout.sleep_while_training=false (or leave it unset)")
            if t.offload_during_rollout:
                raise ConfigError("config keys 'train.staleness' and 'train.offload_during_rollout': with staleness 1 "
                                  "the rollout overlaps training, so the trainer's state cannot leave the device "
                                  "for it; set train.offload_during_rollout=false")
            if lo.behaviour_logprobs == "recompute":
                raise ConfigError("config keys 'train.staleness' and 'loss.behaviour_logprobs': with staleness 1 the "
                                  "rollouts come from the previous weights, which only the engine's recorded "
                                  "log-probs describe; set loss.behaviour_logprobs to auto or rollout")
        if self.server.backend == "lmdeploy" and not self.server.urls and not torch.cuda.is_available():
            raise ConfigError("config key 'server.backend': lmdeploy servers need CUDA; use 'reference' on CPU "
                              "or give server.urls of running servers")
        try:
            canonical_name(self.eval.benchmark)
        except ValueError as e:
            raise ConfigError(f"config key 'eval.benchmark': {e}") from None
        check_seed("eval.seed", self.eval.seed)
        check_positive("eval.num_problems", self.eval.num_problems)
        check_positive("eval.num_samples", self.eval.num_samples)
        check_positive("eval.every", self.eval.every, allow_zero=True)


def register_custom_rewards(custom: dict[str, str]) -> None:
    """Import ``module:function`` for each custom reward and register it under its name."""
    for name, target in custom.items():
        if name in BUILTIN_REWARDS:
            raise ConfigError(f"config key 'custom_rewards.{name}': {name!r} is a built-in reward; give yours another "
                              f"name (built-in: {', '.join(sorted(BUILTIN_REWARDS))})")
        mod, _, fn = target.partition(":")
        if not mod or not fn:
            raise ConfigError(f"config key 'custom_rewards.{name}': expected 'module:function', got {target!r}")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config key 'custom_rewards.{name}': cannot import {target!r}: {e}") from None
        if not callable(f):
            raise ConfigError(f"config key 'custom_rewards.{name}': {target!r} is not a function")
        try:
            inspect.signature(f).bind(None)
        except TypeError:
            raise ConfigError(f"config key 'custom_rewards.{name}': {target!r} must take one argument (a "
                              f"dirl.rewards.RewardContext) and return a float") from None
        except ValueError:
            pass  # no signature to read (some built-in callables): checked when it is called
        register_reward(name, f)


def load_rl_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RLConfig:
    """The RL config of a YAML file plus ``key=value`` overrides, on top of the embedded defaults
    (a section given in the file is merged onto ``RLConfig()``'s own value of it)."""
    return load_config(RLConfig, path, overrides, run_defaults=True)
