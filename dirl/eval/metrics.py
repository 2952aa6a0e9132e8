"""Evaluation metrics (SPEC section 9).

Per benchmark, over the k samples of each problem: accuracy = mean correctness over all samples
(avg@k), pass@j for j <= k with the unbiased estimator, tokens per step = mean over responses of
|o| / |distinct steps|, mean response length (tokens up to and including the stop token), truncation
rate (``finish_reason == "length"``), and the fraction of responses with a boxed answer. The
average over benchmarks is the unweighted mean of each metric.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence

from dirl.rewards.shaping import tokens_per_step

__all__ = ["pass_at_k", "default_pass_ks", "benchmark_metrics", "average_metrics", "tokens_per_step"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), numerically stable
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def default_pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    out.append(k)
    return sorted(set(out))


def _mean(xs: Sequence[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def benchmark_metrics(records: Iterable[Mapping], pass_ks: Optional[Sequence[int]] = None) -> dict:
    """Metrics of one benchmark from its response records.

    A record needs ``problem_id``, ``correct``, ``response_length``, ``finish_reason`` and
    ``tokens_per_step`` (None when the backend gave no step map), optionally ``has_answer`` and
    ``num_steps`` (the decoding steps that kept a token of the response; ``steps_per_response`` is
    their mean, the forwards an answer costs, which tokens per step alone does not show).
    pass@j is reported for the requested j that do not exceed the smallest sample count of a
    problem.
    """
    by_problem: dict[str, list[Mapping]] = defaultdict(list)
    for r in records:
        by_problem[str(r["problem_id"])].append(r)
    flat = [r for rs in by_problem.values() for r in rs]
    if not flat:
        return {"num_problems": 0, "num_responses": 0}
    k_min = min(len(rs) for rs in by_problem.values())
    k_max = max(len(rs) for rs in by_problem.values())
    ks = sorted({j for j in (pass_ks or default_pass_ks(k_min)) if 1 <= j <= k_min})
    out: dict = {
        "num_problems": len(by_problem),
        "num_responses": len(flat),
        "samples_per_problem": k_min if k_min == k_max else [k_min, k_max],
        "accuracy": _mean([1.0 if r["correct"] else 0.0 for r in flat]),
    }
    for j in ks:
        out[f"pass@{j}"] = _mean([pass_at_k(len(rs), sum(bool(r["correct"]) for r in rs), j) for rs in by_problem.values()])
    # accuracy's spread over the k sample rounds (sample j of every problem), when k > 1
    if k_min > 1:
        ordered = [sorted(rs, key=lambda r: r.get("sample", 0)) for rs in by_problem.values()]
        per_round = [_mean([1.0 if rs[j]["correct"] else 0.0 for rs in ordered]) for j in range(k_min)]
        m = sum(per_round) / len(per_round)
        out["accuracy_std_over_samples"] = math.sqrt(sum((x - m) ** 2 for x in per_round) / len(per_round))
    tps = [float(r["tokens_per_step"]) for r in flat if r.get("tokens_per_step") is not None and r.get("response_length", 0) > 0]
    out["tokens_per_step"] = _mean(tps)
    out["steps_per_response"] = _mean([float(r["num_steps"]) for r in flat
                                       if r.get("num_steps") is not None and r.get("response_length", 0) > 0])
    out["mean_response_length"] = _mean([float(r["response_length"]) for r in flat])
    out["truncation_rate"] = _mean([1.0 if r.get("finish_reason") == "length" else 0.0 for r in flat])
    if all("has_answer" in r for r in flat):
        out["answer_rate"] = _mean([1.0 if r["has_answer"] else 0.0 for r in flat])
    return out


AVERAGED = ("accuracy", "tokens_per_step", "steps_per_response", "mean_response_length", "truncation_rate", "answer_rate")


def average_metrics(per_benchmark: Mapping[str, Mapping]) -> dict:
    """Unweighted mean over benchmarks of every metric all of them report."""
    vals = [m for m in per_benchmark.values() if m.get("num_responses")]
    if not vals:
        return {}
    keys = [k for k in vals[0] if (k in AVERAGED or k.startswith("pass@"))]
    out: dict = {"num_benchmarks": len(vals)}
    for k in keys:
        xs = [m.get(k) for m in vals]
        if all(isinstance(x, (int, float)) for x in xs):
            out[k] = float(sum(xs) / len(xs))
    return out
