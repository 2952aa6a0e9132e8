"""Reward functions of SPEC section 7 and their weighted sum.

Rewards are named; a :class:`RewardConfig` gives each a weight and the reward of a trajectory is
``sum(weight[name] * reward_name(trajectory))``. Correctness, used for DAPO filtering and for
metrics, is always the accuracy verdict (a truncated response is never correct), whatever the
weights.

Built-in rewards (per trajectory, see CONTRACTS.md for the trajectory fields):

- ``accuracy``: 1 if correct else 0 (0 when ``finish_reason`` is ``length``).
- ``cosine``: length-aware accuracy. With ℓ the response length and L the maximum length:
  correct → c(ℓ; L, 0.5, 1.0), wrong → c(ℓ; L, 0.0, -0.5), ℓ >= L → -0.5, where
  c(t; T, v_min, v_max) = v_max - (v_max - v_min)(1 - cos(π t / T)) / 2.
- ``speed``: rewards fast decoding. s = tokens per step = |o| / |distinct steps of o| in [1, B];
  t = clip(s - 1, 0, B - 1); correct → c(t; B - 1, 1.0, 0.5), wrong → c(t; B - 1, -0.5, 0.0).
- ``format``: 1 when the response ends normally (a stop token) and holds a complete
  ``\\boxed{...}``, else 0.

More can be added with :func:`register_reward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from dirl.config import ConfigError, FieldError
from dirl.rewards.math import GroundTruth, Grader, extract_answer, get_grader

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """Which rewards make up the total, and their parameters."""

    # reward name -> weight; the total is the weighted sum. Names: accuracy, cosine, speed, format
    # (and any registered with dirl.rewards.register_reward).
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    # L of the cosine reward; None: the caller's max_new_tokens.
    max_length: Optional[int] = None
    # B of the speed reward; None: the caller's block size.
    block_size: Optional[int] = None
    # (value at length 0, value at length L) of the cosine reward.
    cosine_correct: tuple[float, float] = (1.0, 0.5)
    cosine_wrong: tuple[float, float] = (-0.5, 0.0)  # the same for a wrong response
    cosine_exceed: float = -0.5  # a response of L tokens or more
    # (value at 1 token per step, value at B tokens per step) of the speed reward.
    speed_correct: tuple[float, float] = (0.5, 1.0)
    speed_wrong: tuple[float, float] = (0.0, -0.5)  # the same for a wrong response
    # Grading: seconds before a comparison counts as wrong; worker processes (None: automatic).
    grading_timeout: float = 5.0
    grading_workers: Optional[int] = None  # grading subprocesses (None: automatic; 0: in this process)

    def __post_init__(self) -> None:
        if not 0 < self.grading_timeout < float("inf"):  # NaN too
            raise FieldError("grading_timeout", f"must be a finite number of seconds > 0, got {self.grading_timeout!r}")

    def validate(self, prefix: str = "rewards") -> None:
        for name in self.weights:
            if name not in REWARDS:
                raise ConfigError(
                    f"config key '{prefix}.weights.{name}': unknown reward (known: {', '.join(sorted(REWARDS))})"
                )
        if not any(w != 0 for w in self.weights.values()):
            raise ConfigError(f"config key '{prefix}.weights': every weight is 0")
        for key in ("max_length", "block_size"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(f"config key '{prefix}.{key}': must be > 0, got {v!r}")
        if self.grading_workers is not None and self.grading_workers < 0:
            raise ConfigError(f"config key '{prefix}.grading_workers': must be >= 0, got {self.grading_workers!r}")


# --------------------------------------------------------------------------------------------
# Reward functions on plain numbers
# --------------------------------------------------------------------------------------------


def cosine_schedule(t: float, T: float, v_min: float, v_max: float) -> float:
    """c(t; T, v_min, v_max) = v_max - (v_max - v_min)(1 - cos(π t / T)) / 2: v_max at t = 0,
    v_min at t = T (t is clipped to [0, T]; T <= 0 gives v_max)."""
    if T <= 0:
        return float(v_max)
    t = min(max(float(t), 0.0), float(T))
    return float(v_max - (v_max - v_min) * (1.0 - math.cos(math.pi * t / T)) / 2.0)


def tokens_per_step(step_map: Optional[Sequence[int]], response_length: Optional[int] = None) -> Optional[float]:
    """|o| / |distinct steps| over the first ``response_length`` tokens (all when None).

    None when the step map is missing (a backend that does not report one); 0.0 for an empty
    response."""
    if step_map is None:
        return None
    n = len(step_map) if response_length is None else min(int(response_length), len(step_map))
    if n <= 0:
        return 0.0 if (response_length or 0) <= 0 else None
    steps = set(step_map[:n])
    return n / len(steps)


def accuracy_reward(correct: bool) -> float:
    return 1.0 if correct else 0.0


def cosine_reward(correct: bool, length: int, max_length: int, cfg: Optional[RewardConfig] = None) -> float:
    cfg = cfg or RewardConfig()
    if length >= max_length:
        return float(cfg.cosine_exceed)
    at0, atL = cfg.cosine_correct if correct else cfg.cosine_wrong
    return cosine_schedule(length, max_length, v_min=atL, v_max=at0)


def speed_reward(correct: bool, tps: float, block_size: int, cfg: Optional[RewardConfig] = None) -> float:
    cfg = cfg or RewardConfig()
    span = block_size - 1
    t = min(max(float(tps) - 1.0, 0.0), float(span))
    slow, fast = cfg.speed_correct if correct else cfg.speed_wrong
    return cosine_schedule(t, span, v_min=fast, v_max=slow)


def format_reward(text: str, finish_reason: Optional[str]) -> float:
    return 1.0 if finish_reason != "length" and extract_answer(text or "") is not None else 0.0


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass
class RewardContext:
    """What a reward function sees for one trajectory."""

    trajectory: Mapping[str, Any]
    ground_truth: GroundTruth
    correct: bool  # the accuracy verdict
    text: str
    response_length: int
    finish_reason: Optional[str]
    tokens_per_step: Optional[float]
    max_length: Optional[int]
    block_size: Optional[int]
    cfg: RewardConfig


RewardFn = Callable[[RewardContext], float]


class RewardError(ValueError):
    """A reward function failed on a trajectory or returned no finite number (the message names it)."""


def _need(value: Optional[int], what: str, name: str) -> int:
    if value is None:
        raise ValueError(f"the '{name}' reward needs {what}: set it in the reward config or pass it to compute_rewards")
    return int(value)


def _accuracy(c: RewardContext) -> float:
    return accuracy_reward(c.correct)


def _cosine(c: RewardContext) -> float:
    return cosine_reward(c.correct, c.response_length, _need(c.max_length, "max_length", "cosine"), c.cfg)


def _speed(c: RewardContext) -> float:
    if c.tokens_per_step is None:
        raise ValueError("the 'speed' reward needs step maps, and this trajectory has none")
    return speed_reward(c.correct, c.tokens_per_step, _need(c.block_size, "block_size", "speed"), c.cfg)


def _format(c: RewardContext) -> float:
    return format_reward(c.text, c.finish_reason)


REWARDS: dict[str, RewardFn] = {"accuracy": _accuracy, "cosine": _cosine, "speed": _speed, "format": _format}
BUILTIN_REWARDS = frozenset(REWARDS)  # a custom reward cannot take one of these names


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn(ctx: RewardContext) -> float`` usable as ``weights: {name: w}``."""
    if not callable(fn):
        raise TypeError(f"reward {name!r}: {fn!r} is not callable")
    REWARDS[name] = fn


def _call_reward(name: str, ctx: RewardContext, index: int) -> float:
    """``REWARDS[name](ctx)`` as a finite float; a failure names the reward and the trajectory
    (``dirl --debug`` shows the traceback)."""
    try:
        out = REWARDS[name](ctx)
        v = float(out)
    except Exception as e:  # noqa: BLE001 - the reward is the user's code; say which one failed where
        raise RewardError(f"reward {name!r} failed on trajectory {index} of the batch "
                          f"({type(e).__name__}: {e})") from e
    if not math.isfinite(v):
        raise RewardError(f"reward {name!r} returned {v} for trajectory {index} of the batch; rewards must be finite")
    return v


# --------------------------------------------------------------------------------------------
# Batch API
# --------------------------------------------------------------------------------------------


@dataclass
class RewardBatch:
    rewards: list[float]
    correct: list[bool]
    components: dict[str, list[float]]  # reward name -> unweighted values
    tokens_per_step: list[Optional[float]]


_GRADERS: dict[int, Grader] = {}


def grader_for(cfg: RewardConfig) -> Grader:
    """The process-wide grader, or (``grading_workers`` set) a shared one with that many workers."""
    if cfg.grading_workers is None:
        return get_grader()
    g = _GRADERS.get(cfg.grading_workers)
    if g is None or g._closed:
        g = _GRADERS[cfg.grading_workers] = Grader(workers=cfg.grading_workers, timeout=cfg.grading_timeout)
    return g


def response_length_of(traj: Mapping[str, Any]) -> int:
    n = traj.get("response_length")
    return int(n) if n is not None else len(traj.get("token_ids") or [])


def accuracy_verdicts(
    trajectories: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[GroundTruth],
    grader: Optional[Grader] = None,
    timeout: Optional[float] = None,
) -> list[bool]:
    """Correctness of each trajectory: its boxed answer equals the ground truth and it was not
    truncated (``finish_reason == "length"`` is always wrong)."""
    if len(trajectories) != len(ground_truths):
        raise ValueError(f"{len(trajectories)} trajectories but {len(ground_truths)} ground truths")
    grader = grader or get_grader()
    idx = [i for i, t in enumerate(trajectories) if t.get("finish_reason") != "length"]
    verdicts = grader.grade_many([(trajectories[i].get("text") or "", ground_truths[i]) for i in idx], timeout=timeout)
    out = [False] * len(trajectories)
    for i, v in zip(idx, verdicts):
        out[i] = v
    return out


def score_trajectories(
    trajectories: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[GroundTruth],
    cfg: Optional[RewardConfig] = None,
    *,
    max_length: Optional[int] = None,
    block_size: Optional[int] = None,
    grader: Optional[Grader] = None,
) -> RewardBatch:
    """Rewards, correctness and each named reward for a batch of trajectories.

    ``max_length`` / ``block_size`` are used when the config leaves them None (the trainer passes
    its decoding settings)."""
    cfg = cfg or RewardConfig()
    cfg.validate()
    grader = grader or grader_for(cfg)
    correct = accuracy_verdicts(trajectories, ground_truths, grader=grader, timeout=cfg.grading_timeout)
    L = cfg.max_length if cfg.max_length is not None else max_length
    B = cfg.block_size if cfg.block_size is not None else block_size
    names = [n for n, w in cfg.weights.items() if w != 0]
    components: dict[str, list[float]] = {n: [] for n in names}
    rewards: list[float] = []
    tps_all: list[Optional[float]] = []
    for traj, gt, ok in zip(trajectories, ground_truths, correct):
        n = response_length_of(traj)
        tps = tokens_per_step(traj.get("step_map"), n)
        tps_all.append(tps)
        ctx = RewardContext(
            trajectory=traj,
            ground_truth=gt,
            correct=ok,
            text=traj.get("text") or "",
            response_length=n,
            finish_reason=traj.get("finish_reason"),
            tokens_per_step=tps,
            max_length=L,
            block_size=B,
            cfg=cfg,
        )
        total = 0.0
        for name in names:
            v = _call_reward(name, ctx, len(rewards))
            components[name].append(v)
            total += cfg.weights[name] * v
        rewards.append(total)
    return RewardBatch(rewards=rewards, correct=correct, components=components, tokens_per_step=tps_all)


def compute_rewards(
    trajectories: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[GroundTruth],
    cfg: Optional[RewardConfig] = None,
    *,
    max_length: Optional[int] = None,
    block_size: Optional[int] = None,
    grader: Optional[Grader] = None,
) -> tuple[list[float], list[bool]]:
    """(reward, correct) per trajectory; see :func:`score_trajectories`."""
    b = score_trajectories(trajectories, ground_truths, cfg, max_length=max_length, block_size=block_size, grader=grader)
    return b.rewards, b.correct
