"""Rewards: answer extraction, bounded math grading and the reward functions of SPEC section 7.

For the RL trainer::

    from dirl.rewards import RewardConfig, compute_rewards
    rewards, correct = compute_rewards(trajectories, ground_truths, cfg.rewards,
                                       max_length=cfg.decoding.max_new_tokens, block_size=B)

For anything else: ``is_correct(response, ground_truth)`` and ``grade_many(pairs)``.
"""

from dirl.rewards.math import (
    Grader,
    GraderError,
    configure_grader,
    extract_answer,
    get_grader,
    gold_answer,
    grade_many,
    is_correct,
    normalize_answer,
)
from dirl.rewards.shaping import (
    REWARDS,
    RewardBatch,
    RewardConfig,
    RewardContext,
    RewardError,
    accuracy_reward,
    accuracy_verdicts,
    compute_rewards,
    cosine_reward,
    cosine_schedule,
    format_reward,
    register_reward,
    score_trajectories,
    speed_reward,
    tokens_per_step,
)

__all__ = [
    "Grader",
    "GraderError",
    "REWARDS",
    "RewardBatch",
    "RewardConfig",
    "RewardContext",
    "RewardError",
    "accuracy_reward",
    "accuracy_verdicts",
    "compute_rewards",
    "configure_grader",
    "cosine_reward",
    "cosine_schedule",
    "extract_answer",
    "format_reward",
    "get_grader",
    "gold_answer",
    "grade_many",
    "is_correct",
    "normalize_answer",
    "register_reward",
    "score_trajectories",
    "speed_reward",
    "tokens_per_step",
]
